"""The glue ops of a HydraHead layer's fused path, one op per function (fla's way): the GDN heads' short causal
conv, its one-token update, the decay gate, the per-head RMS norms (GDN heads' gated by silu), the q, k and v
slots' preparation (gather, Qwen3's q/k norms, the FA heads' RoPE) with its backward, and, for a prefill without
gradients, the GDN heads' whole input preparation (gather, q/k norms, conv, SiLU, L2 norm, gates: slot_conv) and
every head's output norm at once (head_norms). On CUDA they
are Triton kernels (fla's; the preparations hhbench's own, slot_prep.py); TORCH holds torch ops of the same
signatures and math, so that the fused composition (head order and norm scales folded into the weights, conv states,
shapes) is tested on the CPU, where fla's autotuned kernels cannot run (Triton's interpreter has no benchmarker).

Shapes: conv x [B, T, C] (any strides), weight [C, K], states [B, C, K] in fla's layout (the last K inputs; the
oldest is never read again). gate a [B, T, n] -> log decay, fp32. Norms take o [..., d] and return its dtype.
RoPE (rope_half) takes half tables cos, sin [T, d / 2] (Hugging Face's tables hold each half twice). TORCH's
slot_norm_rope backward differentiates its twin.
"""

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hhbench.kernels.hybrid import head_index
from hhbench.kernels.reference import gdn_decay


@dataclass(frozen=True)
class GlueOps:
    """One implementation of the fused path's glue ops (fla's Triton kernels, or TORCH's torch twins); the
    comments give each op's signature."""

    name: str
    # (x, weight, initial_state, output_final_state) -> (silu(causal conv of x), final state or None)
    conv: Callable
    # (x [B, 1, C], state [B, C, K], weight) -> silu(conv) [B, 1, C]; `state` advances in place
    conv_update: Callable
    # (a, A_log, dt_bias) -> -exp(A_log) * softplus(a + dt_bias) in fp32
    gate: Callable
    # (o, eps) -> o / rms(o) over the last dim
    norm: Callable
    # (o, gate, eps) -> o / rms(o) * silu(gate)
    norm_gated: Callable
    # (slots, plan, weight, eps, cos, sin, into=None) -> the plan's parts: slots gathered, q/k-normed, RoPE'd, those
    # that `into` names written into its tensors (slot_norm_rope)
    slot_norm_rope: Callable
    # (grads, slots, plan, weight, eps, cos, sin, grad_slots) -> weight's gradient or None; writes slots' gradient
    # at the slots the plan reads into grad_slots (slot_norm_rope_backward)
    slot_norm_rope_backward: Callable
    # (slots, sources, weight, eps, conv_weight, a, b, A_log, dt_bias, output_final_state) -> ((q, k, v, g, beta) of
    # the GDN heads, q and k L2-normalized; the conv's final state or None): no backward (slot_conv)
    slot_conv: Callable
    # (o_la, gate, o_fa, eps) -> [B, T, n_fa + n_la, d] in o_la's dtype: norm(o_fa) (none without FA heads), then
    # norm_gated(o_la, gate) (norm(o_la) without gate), o_proj's column order: no backward (head_norms)
    head_norms: Callable


@dataclass(frozen=True)
class SlotPlan:
    """Where slot_norm_rope takes each destination slot from and what it does to it. Destination slot j comes from
    source slot sources[j]; kinds[j] is 0 (a q slot: RMSNorm times the weight's row 0), 1 (a k slot: row 1) or 2 (taken
    as it is); the first n_rope destinations are rotated by RoPE after their norm. The destinations form parts of
    `sizes` slots each, in order, each part one [B, T, n, d] tensor."""

    sources: tuple[int, ...]
    kinds: tuple[int, ...]
    sizes: tuple[int, ...]
    n_rope: int

    def __post_init__(self):
        for source in set(self.sources):
            kinds = {k for s, k in zip(self.sources, self.kinds, strict=True) if s == source}
            if len(kinds) > 1:  # the backward normalizes a source once and gives its gradient to one weight row
                raise ValueError(f"source slot {source} is read as kinds {sorted(kinds)}: a slot is a q, k or v slot")

    @functools.cached_property
    def read(self) -> tuple[int, ...]:
        """The source slots the plan reads, ascending, once each."""
        return tuple(sorted(set(self.sources)))

    @functools.cached_property
    def inverse(self) -> tuple[int, tuple[int, ...]]:
        """The plan from the sources' side, as the backward kernel reads it: (fan-out F, the largest number of
        destinations of one source; [2 + F, R] flattened for the R read sources, ordered by kind (q slots, k slots,
        v slots: their weight gradients are then runs): each one's kind, the source, then its destinations padded
        with -1)."""
        kind_of = dict(zip(self.sources, self.kinds, strict=True))
        read = sorted(self.read, key=lambda source: (kind_of[source], source))
        readers = [[j for j, s in enumerate(self.sources) if s == source] for source in read]
        fan_out = max(len(r) for r in readers)
        padded = [r[f] if f < len(r) else -1 for f in range(fan_out) for r in readers]
        return fan_out, (*(kind_of[source] for source in read), *read, *padded)

    @functools.cached_property
    def table(self) -> tuple[int, ...]:
        """The plan as the kernels read it, [5, J] flattened: sources, kinds, and each destination's part as its first
        slot, its number of slots and its index."""
        firsts = [sum(self.sizes[:i]) for i, n in enumerate(self.sizes) for _ in range(n)]
        counts = [n for n in self.sizes for _ in range(n)]
        parts = [i for i, n in enumerate(self.sizes) for _ in range(n)]
        return (*self.sources, *self.kinds, *firsts, *counts, *parts)

    def check_into(self, into, slots: torch.Tensor) -> None:
        """Raises ValueError unless `into` (slot_norm_rope's destinations: {part index: tensor}) names parts of the
        plan, each with a tensor of the part's shape [B, T, n, d] that slot_norm_rope writes (writable), apart in
        memory (memory_span) from its input slots [B, T, S, d] (else the kernel would read slots it had written)
        and from each other (else two programs would write one place)."""
        B, T, _, d = slots.shape
        for p, dest in into.items():
            shape = (B, T, self.sizes[p], d) if 0 <= p < len(self.sizes) else None
            if dest.shape != shape or not writable(dest):
                raise ValueError(
                    f"slot_norm_rope writes part {p} of parts {self.sizes} into a tensor of shape {shape} with "
                    f"contiguous slots (strides (b, t, {d}, 1), b and t not 0), not {tuple(dest.shape)} of strides "
                    f"{dest.stride()}"
                )
        spans, read = {p: memory_span(dest) for p, dest in sorted(into.items())}, memory_span(slots)
        for p, at in spans.items():
            if spans_overlap(at, read):
                raise ValueError(
                    f"slot_norm_rope's destination of part {p} overlaps the input slots in memory: the kernel would "
                    "read slots it had written"
                )
        for (p, a), (q, b) in itertools.combinations(spans.items(), 2):
            if spans_overlap(a, b):
                raise ValueError(
                    f"slot_norm_rope's destinations of parts {p} and {q} overlap each other in memory: two programs "
                    "would write one place"
                )


def memory_span(t: torch.Tensor) -> tuple[int, int, int]:
    """The memory `t` spans: (its storage's address, first byte, byte past the last) within the storage, from its
    first element to its last by its strides (storage offset + sum((size - 1) stride) + 1 elements), gaps between
    them included; (address, 0, 0) for an empty tensor."""
    address = t.untyped_storage().data_ptr()
    if t.numel() == 0:
        return address, 0, 0
    last = t.storage_offset() + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return address, t.storage_offset() * t.element_size(), (last + 1) * t.element_size()


def spans_overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether two spans (memory_span) share a byte: one storage, ranges that intersect."""
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def writable(dest: torch.Tensor) -> bool:
    """Whether slot_norm_rope writes a part [B, T, n, d] into `dest` of that shape: its slots contiguous (strides
    (b, t, d, 1); the batch and token strides are free: a KV cache's slice [B, T, G, d] at some positions), but not
    0 over more than one sequence or token (an expanded cache, whose one slice the kernel's programs would write at
    once)."""
    B, T, n, d = dest.shape
    sizes, strides = (B, T), dest.stride()[:2]
    slots_contiguous = dest.stride(-1) == 1 and (n == 1 or dest.stride(-2) == d)
    return slots_contiguous and not any(size > 1 and stride == 0 for size, stride in zip(sizes, strides, strict=True))


def slot_norm_rope(slots, plan: SlotPlan, weight, eps, cos, sin, into=None):
    """The fused path's input preparation in torch ops: slots [B, T, S, d] (head slots of the projection's output) ->
    the plan's parts, each [B, T, n, d] contiguous in slots' dtype: destination j is source slot plan.sources[j],
    for a q or k slot (plan.kinds) normalized by its RMS over d (in fp32, eps inside the root) times weight [2, d]'s
    row (Qwen3's q_norm and k_norm weights; weight None: no norm), the first plan.n_rope then rotated by RoPE
    (rotate-half) with half tables cos, sin [T, d / 2] or [B, T, d / 2]. With `into` ({part index: tensor}, as
    SlotPlan.check_into takes it) those parts are copied into those tensors (cast to their dtype), which stand for
    them in the result: decode's KV cache writes. Raises IndexError for a source outside S, ValueError for a
    destination SlotPlan.check_into refuses (of another shape, strided slots, or overlapping slots' memory or another
    destination's)."""
    into = into or {}
    plan.check_into(into, slots)
    x = slots.index_select(2, head_index(plan.sources, slots.device))
    dtype = torch.promote_types(slots.dtype, torch.float32)
    x = x.to(dtype)
    if weight is not None:
        kinds = head_index(plan.kinds, slots.device)
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dtype)[kinds.clamp(max=1)]
        x = torch.where((kinds < 2)[:, None], normed, x)
    if plan.n_rope:
        x = torch.cat([rope_half(x[:, :, : plan.n_rope], cos.to(dtype), sin.to(dtype)), x[:, :, plan.n_rope :]], 2)
    parts = x.to(slots.dtype).split(plan.sizes, 2)
    return tuple(into[p].copy_(part) if p in into else part.contiguous() for p, part in enumerate(parts))


def slot_norm_rope_backward(grads, slots, plan: SlotPlan, weight, eps, cos, sin, grad_slots):
    """slot_norm_rope's backward in torch ops (the twin recomputed and differentiated): grads, the gradients of its
    parts (each [B, T, n, d]) -> writes the gradient of slots [B, T, S, d] at the slots the plan reads (plan.read)
    into grad_slots (slots' shape, any strides; its other slots are left as they are) and returns weight's gradient
    [2, d] in weight's dtype (None without weight)."""
    with torch.enable_grad():
        x = slots.detach().requires_grad_()
        w = None if weight is None else weight.detach().requires_grad_()
        parts = slot_norm_rope(x, plan, w, eps, cos, sin)
        grad = torch.autograd.grad(
            parts, [x] if w is None else [x, w], grads, allow_unused=True, materialize_grads=True
        )
    read = head_index(plan.read, slots.device)
    grad_slots.index_copy_(2, read, grad[0].index_select(2, read))
    return grad[1] if weight is not None else None


def causal_conv(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None):
    """Depthwise causal conv + SiLU over x [B, T, C] with weight [C, K]; `state` [B, C, K] holds the inputs
    before x (its last K-1 are read; zeros when None). Returns (y [B, T, C], the new state [B, C, K])."""
    kernel = weight.shape[-1]
    x_t = x.transpose(1, 2)
    history = x_t.new_zeros(x.shape[0], x.shape[2], kernel - 1) if state is None else state[..., 1:].to(x.dtype)
    padded = torch.cat([history, x_t], dim=-1)
    y = F.conv1d(padded, weight.unsqueeze(1).to(x.dtype), groups=x.shape[2])
    # contiguous, as fla's conv update wants the state it advances in place
    return F.silu(y).transpose(1, 2), padded[..., padded.shape[-1] - kernel :].contiguous()


# The GDN heads' q/k L2 norm's eps: F.normalize's (x / max(||x||, eps)), as the reference glue normalizes them
# (GatedDeltaNetHeads.prepare). fla's l2norm (use_qk_l2norm_in_kernel) adds 1e-6 to the sum of squares instead.
L2_EPS = 1e-12


def gdn_plan(sources: tuple[tuple[int, ...], ...]) -> SlotPlan:
    """The slot plan of the GDN heads' inputs: sources = (q, k, v), each the source slot of every GDN head (a head's
    KV group's k and v slot) -> three parts of n slots, q slots normed with the weight's row 0, k slots with row 1."""
    q, k, v = sources
    return SlotPlan((*q, *k, *v), (0,) * len(q) + (1,) * len(k) + (2,) * len(v), (len(q), len(k), len(v)), 0)


def slot_conv(slots, sources, weight, eps, conv_weight, a, b, A_log, dt_bias, output_final_state=False):
    """The GDN heads' kernel inputs from the projection's output, in torch ops: slots [B, T, S, d] (its head slots);
    sources = (q, k, v), each the n GDN heads' source slots (gdn_plan); weight [2, d] (Qwen3's q/k norm weights) or
    None; conv_weight [3 n d, K] (the q, k and v channels' taps); a, b [B, T, n] (the decay gate's and beta's
    projections), A_log, dt_bias [n] -> ((q, k, v [B, T, n, d] in slots' dtype, contiguous; g, beta [B, T, n] in fp32 at
    least); the conv's final state [B, 3 n d, K] (its last K inputs, zeros before the first token; in slots' dtype) with
    output_final_state, else None). The heads' slots are slot_norm_rope's parts (q/k RMS-normed, in slots' dtype), the
    depthwise causal conv runs from zeros with SiLU (causal_conv), and q and k are then L2-normalized (F.normalize with
    eps L2_EPS), the conv and the L2 norm in fp32 at least without rounding between them; g is gdn_decay(a, A_log,
    dt_bias) and beta sigmoid(b), as GatedDeltaNetHeads.gates. Raises IndexError for a source outside S."""
    parts = slot_norm_rope(slots, gdn_plan(sources), weight, eps, None, None)
    compute = torch.promote_types(slots.dtype, torch.float32)
    y, state = causal_conv(torch.cat(parts, 2).flatten(2).to(compute), conv_weight.to(compute))
    q, k, v = y.unflatten(2, (-1, slots.shape[-1])).split(len(sources[0]), 2)
    q, k = (F.normalize(t, dim=-1, eps=L2_EPS) for t in (q, k))
    g = gdn_decay(a.to(compute), A_log, dt_bias)
    heads = (*(t.to(slots.dtype).contiguous() for t in (q, k, v)), g, torch.sigmoid(b.to(g.dtype)))
    return heads, (state.to(slots.dtype) if output_final_state else None)


def rms_norm(o: torch.Tensor, eps: float) -> torch.Tensor:
    """o / rms(o) over the last dim, without weight, computed in fp32 at least; returns o's dtype."""
    wide = o.to(torch.promote_types(o.dtype, torch.float32))
    return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(o.dtype)


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half convention (GPT-NeoX, Llama; Hugging Face's apply_rotary_pos_emb) from half tables:
    x [B, T, n, d] with halves x1, x2 -> [x1 cos - x2 sin, x2 cos + x1 sin]; cos, sin [T, d / 2] or [B, T, d / 2]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _torch_conv(x, weight, initial_state=None, output_final_state=False):
    y, state = causal_conv(x, weight, initial_state)
    return y, state if output_final_state else None


def _torch_conv_update(x, state, weight):
    y, new = causal_conv(x, weight, state)
    state.copy_(new)
    return y


def _torch_norm_gated(o, gate, eps):
    return rms_norm(o, eps) * F.silu(gate)


def head_norms(o_la, gate, o_fa, eps):
    """Every head's output norm in torch ops, in o_proj's column order (the kernel head order: FA heads, then GDN
    heads): the FA heads' o_fa [B, T, n_fa, d] (None: a layer without FA heads) by its RMS over d, in its dtype, then
    the GDN heads' o_la [B, T, n_la, d] by its RMS times silu(gate) [B, T, n_la, d] (gate None: no gate), in its dtype
    (rms_norm; norm_gated) -> one [B, T, n_fa + n_la, d] in o_la's dtype."""
    la = rms_norm(o_la, eps) if gate is None else _torch_norm_gated(o_la, gate, eps)
    return la if o_fa is None else torch.cat([rms_norm(o_fa, eps).to(la.dtype), la], 2)


TORCH = GlueOps(
    "torch",
    _torch_conv,
    _torch_conv_update,
    gdn_decay,
    rms_norm,
    _torch_norm_gated,
    slot_norm_rope,
    slot_norm_rope_backward,
    slot_conv,
    head_norms,
)


@functools.cache
def fla_ops() -> GlueOps:
    """fla 0.6's fused kernels (imported on first use: fla needs Triton and a GPU build)."""
    from fla.modules.causal_conv1d import causal_conv1d, causal_conv1d_update
    from fla.modules.norm.fused_norm_gate import rms_norm_gated
    from fla.modules.norm.layernorm import rms_norm as fla_rms_norm
    from fla.ops.gated_delta_rule.gate import fused_gdn_gate

    def conv(x, weight, initial_state=None, output_final_state=False):
        return causal_conv1d(
            x, weight, initial_state=initial_state, output_final_state=output_final_state, activation="silu"
        )

    def conv_update(x, state, weight):
        return causal_conv1d_update(x, state, weight=weight, activation="silu")[0]

    def norm(o, eps):
        return fla_rms_norm(o, None, None, eps=eps)

    def norm_gated(o, gate, eps):
        return rms_norm_gated(o, gate, None, None, activation="swish", eps=eps)

    from hhbench.layers import slot_prep

    # slot_norm_rope, its backward, slot_conv and head_norms: hhbench's own kernels (fla has no RMSNorm with a weight per
    # row or a gather, no conv that reads strided slots through a norm or ends in an L2 norm, and takes two norm calls
    # for the GDN and the FA heads, whose Python wrappers took 0.41 ms of an eager 16K step: layer-overhead-h200)
    return GlueOps(
        "fla",
        conv,
        conv_update,
        fused_gdn_gate,
        norm,
        norm_gated,
        slot_prep.slot_norm_rope,
        slot_prep.slot_norm_rope_backward,
        slot_prep.slot_conv,
        slot_prep.head_norms,
    )


@functools.cache
def fla_available() -> bool:
    """Whether fla's glue kernels import here (fla is hhbench's `gpu` extra)."""
    try:
        fla_ops()
    except ImportError:
        return False
    return True
