"""The two distillation losses, as LoLCATs/RADLADS/HALO stage them, and which parameters each stage trains.

Stage 1, attention alignment: every converted layer's attention output regressed (MSE) onto the teacher layer's,
both fed the teacher's hidden states. Layers are independent (each sees the teacher's input, not its
predecessor's output), and only the new parameters train.

Stage 2, end-to-end distillation: KL(teacher || student) of the next-token distributions, positions that predict
an answer token weighted `answer_weight` (issue 11: KL on every token alike left passkey at 0.00 after 12M
tokens; answers weighted 50x gave 0.60 after 5.7M), optionally cross-entropy on the answer tokens added.

Losses return (sum, count) parts: the loss is sum / count with both summed over data-parallel ranks, so that
N ranks with a slice of the batch each give what one process gives on the whole batch.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hhbench.models.convert import HydraAdapter, decoder_layers, parameter_groups

KL_CHUNK = 4096  # positions per chunk of full-vocabulary logits (SmolLM2: 4096 x 49152 fp32 = 0.8 GB)


def converted_layers(model) -> dict[int, HydraAdapter]:
    """The model's converted layers by index: those whose self_attn is a HydraAdapter."""
    return {
        i: layer.self_attn for i, layer in enumerate(decoder_layers(model)) if isinstance(layer.self_attn, HydraAdapter)
    }


def trained_parameters(model, stage: int, train_attn: bool) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """{'new': [...], 'attn': [...]}: what `stage` trains. Stage 1 trains the new parameters; stage 2 also the
    converted layers' q/k/v/o projections with train_attn. Kept FA layers, MLPs and embeddings stay frozen."""
    groups = parameter_groups(model)
    attn = []
    if stage == 2 and train_attn:
        attn = [(n, p) for n, p in groups["reused"] if ".attn.qkv." in n or ".attn.o_proj." in n]
    return {"new": groups["new"], "attn": attn}


def keep_fa_heads(model) -> None:
    """Gradient masks so that training the converted layers' projections (--train-attn) leaves every kept FA
    head the teacher's: its query rows, its o_proj columns and the key/value rows of every KV group an FA head
    reads get zero gradient (AdamW without weight decay then never moves them); GDN heads' slices train."""
    for adapter in converted_layers(model).values():
        hydra = adapter.attn
        if not hydra.n_fa:
            continue
        d, H, KV = hydra.head_dim, hydra.n_heads, hydra.n_kv_heads
        group = H // KV
        fa_groups = {h // group for h in hydra.split.fa_heads}
        rows = torch.ones(H + 2 * KV, dtype=torch.bool)
        for h in hydra.split.fa_heads:
            rows[h] = False
        for g in fa_groups:
            rows[H + g] = rows[H + KV + g] = False
        row_mask = rows.repeat_interleave(d).to(hydra.qkv.weight.device)
        col_mask = rows[:H].repeat_interleave(d).to(hydra.o_proj.weight.device)
        hydra.qkv.weight.register_hook(lambda grad, m=row_mask: grad * m[:, None].to(grad.dtype))
        if hydra.qkv.bias is not None:
            hydra.qkv.bias.register_hook(lambda grad, m=row_mask: grad * m.to(grad.dtype))
        hydra.o_proj.weight.register_hook(lambda grad, m=col_mask: grad * m[None, :].to(grad.dtype))


@torch.no_grad()
def teacher_attention(teacher, ids: torch.Tensor, layers: list[int]) -> dict[int, tuple]:
    """For each layer in `layers`: (attention input [B, T, hidden], (cos, sin), attention output [B, T, hidden])
    of the teacher on ids [B, T]."""
    found: dict[int, tuple] = {}
    hooks = []
    modules = decoder_layers(teacher)
    last = max(layers)

    class Done(Exception):  # nothing after the last aligned layer is needed
        pass

    for i in layers:

        def hook(module, args, kwargs, output, i=i):
            x = kwargs.get("hidden_states", args[0] if args else None)
            found[i] = (x, kwargs["position_embeddings"], output[0])
            if i == last:
                raise Done

        hooks.append(modules[i].self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        getattr(teacher, "model", teacher)(ids, use_cache=False)
    except Done:
        pass
    finally:
        for handle in hooks:
            handle.remove()
    return found


def alignment_loss(student, teacher, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Stage 1: (summed squared error over the converted layers' attention outputs, element count). Zero parts
    for a student without converted layers (0:1, the teacher itself)."""
    adapters = converted_layers(student)
    if not adapters:
        return ids.new_zeros((), dtype=torch.float32), 1.0
    captured = teacher_attention(teacher, ids, sorted(adapters))
    total = 0.0
    count = 0
    for i, adapter in adapters.items():
        x, position_embeddings, target = captured[i]
        out = adapter.attn(x, position_embeddings)
        total = total + (out.float() - target.float()).pow(2).sum()
        count += target.numel()
    return total, float(count)


def position_weights(answer: torch.Tensor, answer_weight: float) -> torch.Tensor:
    """answer [B, T + 1] (answer token ids) -> weights [B, T] of the positions predicting tokens 1..T."""
    target_is_answer = answer[:, 1:]
    return 1.0 + (answer_weight - 1.0) * target_is_answer.float()


def _chunk_kl(h_student, h_teacher, weight, position_weight, targets, answer):
    student = F.linear(h_student, weight).float().log_softmax(-1)
    with torch.no_grad():
        teacher = F.linear(h_teacher, weight).float().log_softmax(-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    nll = -student.gather(-1, targets[:, None]).squeeze(-1)
    return (kl * position_weight).sum(), (nll * answer).sum()


def distillation_loss(
    student, teacher, ids: torch.Tensor, answer: torch.Tensor, answer_weight: float
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Stage 2 on ids [B, T + 1] with answer mask [B, T + 1]: (weighted KL sum, answer NLL sum, weight sum,
    answer count). Logits are made CHUNK positions at a time and recomputed in the backward pass, so no
    [B, T, vocab] tensor is ever held (a student and a teacher copy in fp32 would be 13 GB at 16 x 2K)."""
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        h_teacher = getattr(teacher, "model", teacher)(inputs, use_cache=False).last_hidden_state
    h_student = getattr(student, "model", student)(inputs, use_cache=False).last_hidden_state
    weight = student.get_output_embeddings().weight
    w = position_weights(answer, answer_weight).reshape(-1)
    is_answer = answer[:, 1:].reshape(-1).float()
    hs, ht, flat_targets = (
        h_student.reshape(-1, h_student.shape[-1]),
        h_teacher.reshape(-1, h_teacher.shape[-1]),
        targets.reshape(-1),
    )
    kl = nll = 0.0
    for start in range(0, hs.shape[0], KL_CHUNK):
        part = slice(start, start + KL_CHUNK)
        args = (hs[part], ht[part], weight, w[part], flat_targets[part], is_answer[part])
        if hs.requires_grad:
            k, n = checkpoint(_chunk_kl, *args, use_reentrant=False)
        else:
            k, n = _chunk_kl(*args)
        kl, nll = kl + k, nll + n
    return kl, nll, float(w.sum()), float(is_answer.sum())
