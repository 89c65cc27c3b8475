"""A 2-layer Llama wired by hand so that exactly one head copies from the context (an induction circuit), with a
character-level tokenizer that drops whitespace. Used by the head-selection tests.

Residual stream (hidden 64): dim 0 = 1 for every token; dims 1..11 = one-hot code of the digits and ':'
(CODED); dim 12 = 1 for every other token (so all embeddings have the same norm); dims 13..23 = the previous
token's code (written by layer 0 head 0); dims 24..34 = the copied code (written by layer 1 head COPY_HEAD).
- layer 0, head 0: previous-token head. q and k read the constant dim into the fast RoPE pairs with q = R(-theta)k
  per pair, so q_m.k_n = |k|^2 sum_i cos((n - m + 1) theta_i), largest at n = m - 1; v copies the code.
- layer 1, head COPY_HEAD: induction head. q reads the current token's code, k the previous-token code, both
  into the slow RoPE pairs (nearly position-free over these lengths): position n scores high when the token
  before n equals the current token, i.e. n holds the token that followed it. v copies n's code into
  dims 24..34, which the LM head reads as logits.
Every other head has q = 0 and o = 0; the MLPs are 0. So after "...is:" the model attends to the needle value
and copies it digit by digit.
"""

import math
import string

import torch

from hhbench.select import probes as P

COPY_HEAD = (1, 2)
CODED = list("0123456789:")
HEAD_DIM, N_HEADS, N_KV, HIDDEN = 32, 4, 2, 64
ROPE_THETA = 1e6
FAST_PAIRS = range(0, 6)  # RoPE pairs (i, i + 16) with theta_i = 1e6^(-i/16): 1 .. 0.013 rad a position
SLOW_DIMS = [10, 11, 12, 13, 14, 15, 26, 27, 28, 29, 30]  # pairs 10..15: < 2e-4 rad a position


def vocabulary() -> list[str]:
    texts = [P.INTRO, P.NEEDLE, P.QUESTION, P.NEEDLE_END, *P.FILLER, *P.KEYS]
    chars = set("".join(texts)) | set(string.digits) | set(string.ascii_letters)
    return ["[UNK]", *sorted(c for c in chars if not c.isspace())]


def tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = vocabulary()
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        head_dim=HEAD_DIM,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    lm = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.zero_()
        for norm in [lm.model.norm, *(m for layer in lm.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm))]:  # fmt: skip
            norm.weight.fill_(1.0)
        emb = lm.model.embed_tokens.weight
        emb[:, 0] = 1.0
        for token, char in enumerate(vocab):
            if char in CODED:
                emb[token, 1 + CODED.index(char)] = 1.0
            else:
                emb[token, 12] = 1.0
        half = HEAD_DIM // 2
        # layer 0, head 0 (KV group 0): previous-token head
        a0 = _prev_token_scale()
        attn = lm.model.layers[0].self_attn
        for i in FAST_PAIRS:
            theta = ROPE_THETA ** (-2 * i / HEAD_DIM)
            attn.k_proj.weight[i, 0] = a0
            attn.q_proj.weight[i, 0] = a0 * math.cos(theta)
            attn.q_proj.weight[i + half, 0] = -a0 * math.sin(theta)
        for j in range(len(CODED)):
            attn.v_proj.weight[j, 1 + j] = 1.0
            attn.o_proj.weight[13 + j, j] = 1.0
        # layer 1, COPY_HEAD (KV group 1): induction head
        layer, head = COPY_HEAD
        attn = lm.model.layers[layer].self_attn
        group = head // (N_HEADS // N_KV)
        for j, dim in enumerate(SLOW_DIMS):
            attn.q_proj.weight[head * HEAD_DIM + dim, 1 + j] = 6.0
            attn.k_proj.weight[group * HEAD_DIM + dim, 13 + j] = 6.0
            attn.v_proj.weight[group * HEAD_DIM + j, 1 + j] = 1.0
            attn.o_proj.weight[24 + j, head * HEAD_DIM + j] = 1.0
        for j, char in enumerate(CODED):
            lm.lm_head.weight[vocab.index(char), 24 + j] = 10.0
    return lm


def _prev_token_scale(max_len: int = 2048, gap: float = 40.0) -> float:
    """k's size so that the previous position beats every other one by `gap` logits (after RMSNorm's factor
    sqrt(hidden / 2) on the constant dim and attention's 1/sqrt(head_dim))."""
    thetas = torch.tensor([ROPE_THETA ** (-2 * i / HEAD_DIM) for i in FAST_PAIRS])
    offsets = torch.arange(-max_len, 1, dtype=torch.float64)  # n - m
    scores = torch.cos((offsets[:, None] + 1) * thetas[None, :]).sum(-1)
    margin = scores[max_len - 1] - torch.cat([scores[: max_len - 1], scores[max_len:]]).max()
    norm = math.sqrt(HIDDEN / 2)
    return math.sqrt(gap * math.sqrt(HEAD_DIM) / (float(margin) * norm**2))
