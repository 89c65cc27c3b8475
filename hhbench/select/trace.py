"""Per-head measurements on a Hugging Face causal LM of the Llama family (Llama, Mistral, Qwen2/3, SmolLM).

Three forward passes a probe, whatever the number of heads:
1. clean (probe + its answer, teacher-forced): through an attention function of ours (registered with
   transformers' AttentionInterface) that runs SDPA and, on the side, takes each head's argmax attention from
   the answer-predicting query rows only (q.k of those rows, post-RoPE: no L x L matrix), and keeps the post-RoPE
   keys and values before the patch position;
2. counterfactual, up to the patch position: each head's output (the per-head slice of o_proj's input) there;
3. patched: one token, the patch position, in one batch row per head (plus one unpatched row). Row (l, h) gets
   head h of layer l replaced by its counterfactual output; every row attends to the clean run's keys and values
   of the shared prefix, broadcast, not copied. Causality makes this exact: a change at the last position cannot
   reach an earlier one, so the clean prefix is the patched run's prefix too.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hhbench.errors import UserError, require_extra
from hhbench.select.probes import Probe
from hhbench.spec.shapes import shape_from_config_dict

IMPL = "hhbench_trace"


@dataclass
class _Pass:
    """What the attention function and the o_proj hooks do during one forward."""

    rows: torch.Tensor | None = None  # query positions whose argmax attention is taken
    keep: int = 0  # keep keys and values of positions < keep
    record_at: int | None = None  # take each head's output at this position
    prefix: dict | None = None  # patch pass: layer -> (K, V) of the shared prefix
    patch: dict | None = None  # patch pass: layer -> (batch rows, heads)
    values: torch.Tensor | None = None  # patch pass: [L, H, d] counterfactual head outputs
    argmax: dict = field(default_factory=dict)  # layer -> [H, len(rows)] key positions
    kv: dict = field(default_factory=dict)  # layer -> (K, V) [KVH, keep, d]
    outputs: dict = field(default_factory=dict)  # layer -> [H, d]


_ACTIVE: list[_Pass] = []


def _argmax_rows(query, key, rows: torch.Tensor, offset: int, scaling: float) -> torch.Tensor:
    """The key position each head attends to most, for the query positions `rows` only (absolute positions;
    query [1, H, Tq, d] holds positions offset..offset+Tq-1, key [1, KVH, Tk, d] all from 0)."""
    n_kv, heads, d = key.shape[1], query.shape[1], query.shape[-1]
    q = query[0, :, rows - offset].reshape(n_kv, heads // n_kv, len(rows), d)
    scores = torch.einsum("kgnd,ktd->kgnt", q.float(), key[0].float()) * scaling
    future = torch.arange(key.shape[2], device=key.device)[None, :] > rows[:, None]
    return scores.masked_fill(future, float("-inf")).argmax(-1).reshape(heads, len(rows))


def _prefix_attention(query, key, value, prefix_k, prefix_v, scaling: float) -> torch.Tensor:
    """One query token per batch row against a prefix shared by all rows ([KVH, Tp, d]) plus the row's own key."""
    batch, heads, _, d = query.shape
    n_kv = prefix_k.shape[0]
    q = query[:, :, 0].reshape(batch, n_kv, heads // n_kv, d)
    own_k, own_v = key[:, :, 0, None, :], value[:, :, 0, None, :]  # [B, KVH, 1, d]
    scores = torch.cat([torch.einsum("bkgd,ktd->bkgt", q, prefix_k), (q * own_k).sum(-1, keepdim=True)], dim=-1).float()
    weights = torch.softmax(scores * scaling, dim=-1).to(value.dtype)
    out = torch.einsum("bkgt,ktd->bkgd", weights[..., :-1], prefix_v) + weights[..., -1:] * own_v
    return out.reshape(batch, heads, 1, d)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """AttentionInterface function: causal SDPA after the pass's shared prefix, plus the pass's side records."""
    state = _ACTIVE[-1]
    layer = module.layer_idx
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if state.prefix is not None and query.shape[0] > 1:  # the patch pass: one token per row
        out = _prefix_attention(query, key, value, *state.prefix[layer], scaling)
        return out.transpose(1, 2).contiguous(), None
    if state.prefix is not None:  # a continuation of the shared prefix
        prefix_k, prefix_v = state.prefix[layer]
        key, value = torch.cat([prefix_k[None], key], dim=2), torch.cat([prefix_v[None], value], dim=2)
    offset = key.shape[2] - query.shape[2]
    if state.rows is not None:
        state.argmax[layer] = _argmax_rows(query, key, state.rows, offset, scaling)
    if state.keep:
        state.kv[layer] = (key[0, :, : state.keep], value[0, :, : state.keep])
    mask = None
    if offset:
        positions = torch.arange(query.shape[2], device=query.device)[:, None] + offset
        mask = torch.arange(key.shape[2], device=query.device)[None, :] <= positions
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=not offset, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    require_extra("transformers").AttentionInterface.register(IMPL, _attention)


@dataclass
class ProbeResult:
    """One probe's per-head measurements: needle hits of each head's argmax attention [L, H] and the logit
    differences (right - counterfactual answer token) clean, corrupt, unpatched and patched per head [L, H]."""

    hits: torch.Tensor  # [L, H] copied needle tokens the head's argmax attention found
    copied: int  # answer tokens the model copies (argmax = next answer token) that occur in the needle
    exact: bool  # every answer token copied
    ld_clean: float  # logit(right) - logit(counterfactual) at the patch position, clean run
    ld_corrupt: float  # the same in the counterfactual run
    ld_base: float  # the same from the patch pass's unpatched row (the baseline patched rows are compared with)
    ld_patched: torch.Tensor  # [L, H]


class HeadTracer:
    """Context manager: switches a loaded model to the tracing attention and hooks every o_proj."""

    def __init__(self, model, max_rows: int = 512):
        self.model = model
        self.max_rows = max_rows
        attns = [m for m in model.modules() if hasattr(m, "o_proj") and hasattr(m, "layer_idx")]
        if not attns or not hasattr(model, "base_model") or model.get_output_embeddings() is None:
            raise UserError(f"{type(model).__name__} is not a Llama-family causal LM (no attention with o_proj)")
        self.attns = sorted(attns, key=lambda m: m.layer_idx)
        config = model.config
        shape = shape_from_config_dict(config.to_dict(), type(model).__name__, f"{type(model).__name__} config")
        if shape.windowed:  # the tracing attention attends to every earlier key
            raise UserError(
                f"{shape.name} has sliding-window attention ({shape.windowed}): the head tracer computes full "
                "attention only and would score heads on attention the model does not compute"
            )
        self.n_layers, self.n_heads = len(self.attns), config.num_attention_heads
        self.head_dim = self.attns[0].head_dim
        self.device = next(model.parameters()).device
        self._hooks = []
        self._previous = None

    def __enter__(self) -> "HeadTracer":
        _register()
        self._previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(IMPL)
        for attn in self.attns:
            self._hooks.append(attn.o_proj.register_forward_pre_hook(self._o_proj_hook(attn.layer_idx)))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.model.set_attn_implementation(self._previous)

    def _o_proj_hook(self, layer: int):
        def hook(_module, args):
            if not _ACTIVE:
                return None
            state, x = _ACTIVE[-1], args[0]
            if state.record_at is not None:
                state.outputs[layer] = x[0, state.record_at].reshape(self.n_heads, self.head_dim).clone()
            if state.patch is not None and layer in state.patch:
                rows, heads = state.patch[layer]
                x = x.clone().view(x.shape[0], x.shape[1], self.n_heads, self.head_dim)
                x[rows, -1, heads] = state.values[layer, heads].to(x.dtype)
                return (x.flatten(2), *args[1:])
            return None

        return hook

    def _forward(self, state: _Pass, ids: torch.Tensor, position: int = 0, logits: int = 0) -> torch.Tensor:
        """One pass over ids [B, T] at positions position..; the last `logits` logits of row 0, else the final
        hidden states [B, T, hidden]."""
        positions = torch.arange(position, position + ids.shape[1], device=self.device).expand_as(ids)
        _ACTIVE.append(state)
        try:
            if logits:
                out = self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=logits)
                return out.logits[0].float()
            return self.model.base_model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        finally:
            _ACTIVE.pop()

    def _ids(self, tokens) -> torch.Tensor:
        return torch.tensor([list(tokens)], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def run(self, probe: Probe) -> ProbeResult:
        """The three passes over one probe (module docstring) -> its ProbeResult."""
        L, H = self.n_layers, self.n_heads
        P, split, answer = probe.prompt_len, probe.split, probe.answer
        right, wrong = probe.clean[split + 1], probe.corrupt[split + 1]
        start, end = probe.needle
        n = len(answer)
        # 0. the haystack before the needle, shared by both runs: its keys and values
        shared = _Pass(keep=start)
        self._forward(shared, self._ids(probe.clean[:start]))
        # 1. clean, teacher-forced: logits and argmax attention of the n answer-predicting rows
        rows = torch.arange(P - 1, P - 1 + n, device=self.device)
        clean = _Pass(rows=rows, keep=split, prefix=shared.kv)
        logits = self._forward(clean, self._ids(probe.clean[start:-1]), start, logits=n)
        predicted = logits.argmax(-1).tolist()
        ld_clean = (logits[split - (P - 1), right] - logits[split - (P - 1), wrong]).item()
        needle_tokens = set(probe.clean[start:end])
        hits = torch.zeros(L, H)
        copied = 0
        for i, token in enumerate(answer):
            if predicted[i] != token or token not in needle_tokens:
                continue
            copied += 1
            for layer in range(L):
                for head, j in enumerate(clean.argmax[layer][:, i].tolist()):
                    hits[layer, head] += start <= j < end and probe.clean[j] == token
        # 2. counterfactual up to the patch position: its logit difference and every head's output there
        corrupt = _Pass(record_at=split - start, prefix=shared.kv)
        last = self._forward(corrupt, self._ids(probe.corrupt[start : split + 1]), start, logits=1)[-1]
        ld_corrupt = (last[right] - last[wrong]).item()
        values = torch.stack([corrupt.outputs[layer] for layer in range(L)])
        # 3. one token, one row per head, against the clean prefix
        ld_rows = self._patched(clean.kv, values, probe.clean[split], split, right, wrong)
        return ProbeResult(
            hits=hits,
            copied=copied,
            exact=predicted == list(answer),
            ld_clean=ld_clean,
            ld_corrupt=ld_corrupt,
            ld_base=ld_rows[0].item(),
            ld_patched=ld_rows[1:].reshape(L, H),
        )

    def _patched(self, prefix: dict, values, token: int, position: int, right: int, wrong: int) -> torch.Tensor:
        """Logit differences of the unpatched row, then of each head patched, in (layer, head) order."""
        heads = [None] + [(layer, head) for layer in range(self.n_layers) for head in range(self.n_heads)]
        unembed = self.model.get_output_embeddings()
        weight = unembed.weight[[right, wrong]].float()
        bias = unembed.bias[[right, wrong]].float() if getattr(unembed, "bias", None) is not None else 0.0
        out = []
        for first in range(0, len(heads), self.max_rows):
            chunk = heads[first : first + self.max_rows]
            patch: dict[int, tuple[list[int], list[int]]] = {}
            for row, item in enumerate(chunk):
                if item is not None:
                    patch.setdefault(item[0], ([], []))
                    patch[item[0]][0].append(row)
                    patch[item[0]][1].append(item[1])
            state = _Pass(prefix=prefix, values=values, patch=patch)
            ids = torch.full((len(chunk), 1), token, dtype=torch.long, device=self.device)
            two = self._forward(state, ids, position)[:, -1].float() @ weight.T + bias
            out.append(two[:, 0] - two[:, 1])
        return torch.cat(out).cpu()
