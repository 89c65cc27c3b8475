"""The HydraHead attention layer: one fused QKV projection; FA heads through an FA backend (with RoPE and their
KV groups), GDN heads through a GDN backend with GDN's parametrization; every head's output RMS-normalized and
scaled by a learned per-head gamma (GDN heads also output-gated); heads back in their original order; output
projection. A layer with no GDN head is a plain attention layer (no head norms), so an all-FA plan is the
vanilla model and layer-wise FA layers are untouched; a layer with no FA head is a full GDN layer.
"""

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hhbench.kernels import registry
from hhbench.kernels.hybrid import HybridCore, grad_flows, head_index
from hhbench.layers import glue
from hhbench.layers.gdn_heads import GatedDeltaNetHeads
from hhbench.spec.axes import SEQUENTIAL, dtype_name
from hhbench.spec.layout import HeadSplit

# The layer's glue: "reference" (torch ops, gathers on activations), "fused" (glue.py's ops with the head order
# folded into the weights; fla's kernels on CUDA, their torch twins on the CPU), or "auto": fused on CUDA where fla
# imports and the GDN heads, if any, run on one of fla's backends (a layer without GDN heads, as layer-wise
# hybrids' FA layers, needs no GDN backend for it: so the layer-wise baseline's RoPE and projection are as fused as
# HydraHead's), reference elsewhere.
GLUES = ("auto", "reference", "fused")
FUSED_GDN_BACKENDS = ("fla-chunk", "flash-qla", "fla-recurrent")


@functools.cache
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary tables (rotate-half convention, as Hugging Face writes them): [T, head_dim] each."""
    angles = positions.float()[:, None] * _inv_freq(head_dim, theta, positions.device)[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_table(length: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's half tables (cos, sin) [L, head_dim / 2] for positions 0..L-1, L >= `length`: row t is the first half
    of rope_cos_sin's row for position t (its second half repeats it). Made once per head_dim, theta, device and
    dtype and shared by every layer, grown (to a power of two) when a longer one is asked, so that a step slices
    them instead of computing positions, angles, cos and sin. Kept as normal tensors (not inference tensors), so
    that training may save them for its backward after an inference call made them."""
    key = (head_dim, theta, torch.device(device), dtype)
    tables = _ROPE_TABLES.get(key)
    if tables is None or tables[0].shape[0] < length:
        with torch.inference_mode(False), torch.no_grad():
            positions = torch.arange(1 << max(length - 1, 1).bit_length(), device=device, dtype=torch.float32)
            angles = positions[:, None] * _inv_freq(head_dim, theta, positions.device)[None, :]
            tables = _ROPE_TABLES[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
    return tables


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, n, d]; cos, sin [T, d] or [B, T, d]."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _kernel_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the attention kernels see for layer input x: autocast's where it is on (the projections cast)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def head_rms_norm(o: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """o [B, T, n, d] normalized per head, times that head's scale [n, d] (norm weight times gamma)."""
    dtype = torch.promote_types(o.dtype, torch.float32)
    wide = o.to(dtype)
    return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps) * scale.to(dtype)).to(o.dtype)


# The gather's word: torch's index_select (a gather kernel on CUDA) copies one element per thread, so 2-byte bf16
# slots ran at about a quarter of the H200's bandwidth (0.78 ms for head 7:1's k and v at 64K, results/layer-overhead-
# h200). The same bytes taken as 8-byte words are a quarter of the elements.
_WORD = torch.int64


def _as_words(t: torch.Tensor, word: torch.dtype = _WORD) -> torch.Tensor | None:
    """t [..., d] viewed as words of dtype `word` (8 bytes: [..., d * itemsize / 8]; the same memory), or None where it
    cannot be: a last dim that is strided or not a whole number of words, an offset or stride that is not, or a start
    off a word's bound (memory from elsewhere, DLPack's or a buffer's at a byte offset, may start off one at offset 0;
    CUDA faults on misaligned 8-byte loads)."""
    ratio = word.itemsize // t.element_size()
    if ratio <= 1 or t.stride(-1) != 1 or t.shape[-1] % ratio or t.storage_offset() % ratio:
        return None
    if t.data_ptr() % word.itemsize or any(stride % ratio for stride in t.stride()[:-1]):
        return None
    return t.view(word)


def _select_words(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    words = _as_words(t)
    return t.index_select(2, index) if words is None else words.index_select(2, index).view(t.dtype)


def slot_run(t: torch.Tensor, start: int, stop: int, head_dim: int) -> torch.Tensor:
    """Head slots start..stop-1 of a projection's output t [B, T, W] (slot s: columns s d .. (s + 1) d - 1) as a view
    [B, T, stop - start, head_dim]."""
    return t[..., start * head_dim : stop * head_dim].unflatten(-1, (stop - start, head_dim))


class SlotPrep(NamedTuple):
    """A slot_norm_rope call of the fused path on a projection's output [B, T, W] (its first n_slots head slots of
    head_dim): the glue's ops (GlueOps: its slot_norm_rope and backward), the plan, the norm's eps, RoPE's half tables
    (None without RoPE slots)."""

    ops: glue.GlueOps
    plan: glue.SlotPlan
    n_slots: int
    head_dim: int
    eps: float
    cos: torch.Tensor | None
    sin: torch.Tensor | None

    def forward(self, base: torch.Tensor, weight: torch.Tensor | None, into=None) -> tuple[torch.Tensor, ...]:
        """The plan's parts of `base` (q/k norm weight [2, d] or None), those that `into` names ({part index: tensor})
        written into its tensors."""
        slots = slot_run(base, 0, self.n_slots, self.head_dim)
        return self.ops.slot_norm_rope(slots, self.plan, weight, self.eps, self.cos, self.sin, into)

    def backward(self, grads, base, weight, grad: torch.Tensor) -> torch.Tensor | None:
        """Writes the gradient of base's slots the plan reads, from its parts' gradients `grads`, into `grad` (base's
        shape); returns weight's gradient (None without weight)."""
        slots, grad_slots = (slot_run(t, 0, self.n_slots, self.head_dim) for t in (base, grad))
        return self.ops.slot_norm_rope_backward(
            grads, slots, self.plan, weight, self.eps, self.cos, self.sin, grad_slots
        )


class _Parts(torch.autograd.Function):
    """take_parts under autograd: the parts are the same slot_norm_rope parts, views and gathers, and the gradient of
    the tensor they come from is assembled in one buffer, slot_norm_rope's backward writing the slots it reads and each
    other part's gradient added into its region in place. Left to autograd, every view's backward would make a zero
    tensor of the whole projection output and the engine would add them up: for a layer with FA and GDN heads six such
    tensors (a gather's own zeros among them) and four adds a training step, each the size of the output or of its
    slot part. With slot_norm_rope's parts a backward that would build a graph (create_graph: a second derivative)
    raises RuntimeError, as its backward builds none (torch's once_differentiable sees only the parts' gradients,
    not the slots the norm's backward depends on)."""

    @staticmethod
    def forward(ctx, base, weight, takes, prep):
        ctx.takes, ctx.prep, ctx.base_shape = takes, prep, base.shape
        ctx.save_for_backward(base if prep is not None else None, weight)
        prepared = () if prep is None else prep.forward(base, weight)
        return (*prepared, *(_take_part(base, view, index) for view, index in takes))

    @staticmethod
    def backward(ctx, *grads):
        if ctx.prep is not None and torch.is_grad_enabled():  # create_graph: the twin's grad and the kernel build none
            raise RuntimeError(
                "slot_norm_rope's backward is not differentiable: no second derivative (create_graph) through the "
                "fused glue's inputs; take the reference glue (glue='reference')"
            )
        grad, grad_weight = grads[0].new_zeros(ctx.base_shape), None
        if ctx.prep is not None:  # first, as it writes its slots where the views' gradients are added
            n_parts = len(ctx.prep.plan.sizes)
            grad_weight = ctx.prep.backward(grads[:n_parts], *ctx.saved_tensors, grad)
            grads = grads[n_parts:]
        for (view, index), part_grad in zip(ctx.takes, grads, strict=True):
            region = view(grad)
            region.add_(part_grad) if index is None else region.index_add_(2, index, part_grad)
        return grad, grad_weight, None, None


def _take_part(base: torch.Tensor, view, index: torch.Tensor | None) -> torch.Tensor:
    return view(base) if index is None else _select_words(view(base), index)


def take_parts(base: torch.Tensor, takes, prep: SlotPrep | None = None, weight=None, into=None):
    """The parts of `base` that `takes` names, each (view, index): view(base), a view (a function of one tensor that
    returns a view of it), or with an index [n] (long, on base's device) view(base).index_select(2, index) (head slots
    [B, T, S, d] by select_slots' words); before them, with `prep`, the parts of its slot_norm_rope with q/k norm
    weight `weight` ([2, d] or None), those that `into` names ({part index: tensor}, glue.SlotPlan.check_into) written
    into its tensors, which stand for them in the result. Under autograd one node takes them all, so that base's
    gradient is one buffer (_Parts) and slot_norm_rope's backward one kernel; `into` is then written by copies of the
    node's parts, so that autograd records the writes (the op's own writes would leave the tensors without history).
    Returns a tuple of tensors."""
    if grad_flows(base, weight):
        parts = _Parts.apply(base, weight, takes, prep)
        if not into:
            return parts
        prep.plan.check_into(into, slot_run(base, 0, prep.n_slots, prep.head_dim))
        return tuple(into[p].copy_(part) if p in into else part for p, part in enumerate(parts))
    prepared = () if prep is None else prep.forward(base, weight, into)
    return (*prepared, *(_take_part(base, view, index) for view, index in takes))


def select_slots(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t.index_select(2, index) for head slots t [B, T, S, d] (index [n] long, on t's device) -> [B, T, n, d], the
    same values and gradients, gathered as 8-byte words where t's layout allows (_as_words). Raises IndexError for an
    index outside S."""
    return take_parts(t, ((_whole, index),))[0]


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


class FusedWeights(NamedTuple):
    """The fused path's weights (HydraAttention._fused_weights): one input projection with its bias, o_proj with
    the head order and per-head norm scales folded in (whole: the FA heads' columns, then the GDN heads'; o_fa and
    o_gdn are views of it), the GDN conv taps and the q and k norms' weights. A layer without GDN heads holds its
    own qkv and o_proj parameters (its slots are their rows in order, its heads have no norms) and no GDN fields."""

    projection: torch.Tensor  # [S d + 2 n_la + pad (+ n_la d), hidden]: q/k/v slots, a, b rows, zero rows, (gate)
    bias: torch.Tensor | None
    # [hidden, H d]: o_proj's columns in kernel head order (FA heads', then GDN heads'), scaled per head
    o: torch.Tensor
    fa_columns: int  # n_fa d: how many of o's columns are the FA heads'
    conv: torch.Tensor | None  # [3 n_la d, K]
    qk_norm: torch.Tensor | None  # [2, d]: Qwen3's q_norm and k_norm weights; None without

    @property
    def o_fa(self) -> torch.Tensor | None:
        """o's FA head columns [hidden, n_fa d] (a view); None without FA heads."""
        return self.o[:, : self.fa_columns] if self.fa_columns else None

    @property
    def o_gdn(self) -> torch.Tensor | None:
        """o's GDN head columns [hidden, n_la d] (a view); None without GDN heads."""
        return self.o[:, self.fa_columns :] if self.o.shape[1] > self.fa_columns else None


@dataclass
class LayerCache:
    """Decoding state of one layer: RoPE'd K and V of the FA groups, GDN state and conv states."""

    k: torch.Tensor | None  # [B, S_max, fa_groups, d]
    v: torch.Tensor | None
    length: int  # tokens held
    state: torch.Tensor | None  # [B, n_la, dk, dv], fp32
    conv: torch.Tensor | None  # [B, 3 n_la d, K]: the GDN heads' q, k, v conv inputs (glue.py's layout)

    def kv_at(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at one token position: views [B, 1, fa_groups, d] of k and v (their strides), which write the
        cache there; for a layer with FA heads (k and v not None)."""
        return self.k[:, position : position + 1], self.v[:, position : position + 1]

    def ensure_capacity(self, length: int) -> None:
        """Grow the FA K/V buffers (doubling) so that they hold `length` tokens: decoding of unknown length."""
        if self.k is None or self.k.shape[1] >= length:
            return
        size = max(length, 2 * self.k.shape[1])
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], size, *old.shape[2:])
            new[:, : old.shape[1]] = old
            setattr(self, name, new)


class HydraAttention(nn.Module):
    """HydraHead attention layer: the heads `fa_heads` (indices into n_heads) run full attention through
    `fa_backend`, the others Gated DeltaNet through `gdn_backend`, in one layer (module docstring). Backends are
    Backend objects or registry names ("auto"); `mode` runs them one after the other or on two CUDA streams; `glue`
    picks the glue around them (GLUES). x [B, T, hidden] -> [B, T, hidden]. Raises ValueError for an unknown glue."""

    def __init__(
        self,
        hidden: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        fa_heads,
        conv_size: int = 4,
        output_gate: bool = True,
        chunk_size: int = 64,
        fa_backend: "str | registry.Backend" = "auto",
        gdn_backend: "str | registry.Backend" = "auto",
        mode: str = SEQUENTIAL,
        rope_theta: float = 10000.0,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        qkv_bias: bool = False,
        o_bias: bool = False,
        gdn_gate_bias: bool = False,
        glue: str = "auto",
    ):
        super().__init__()
        if glue not in GLUES:
            raise ValueError(f"glue {glue!r}: choose from {', '.join(GLUES)}")
        self.glue = glue
        self.hidden, self.n_heads, self.n_kv_heads, self.head_dim = hidden, n_heads, n_kv_heads, head_dim
        self.split = HeadSplit(n_heads, tuple(sorted(fa_heads)), n_heads // n_kv_heads)
        # Backends: resolved ones (kernels.registry.Backend, as the sweep passes them) or names, which are resolved
        # once per device and pass (_core), never on every call.
        self.fa_backend, self.gdn_backend, self.mode = fa_backend, gdn_backend, mode
        self._cores: dict[tuple[str, str], HybridCore] = {}
        self.rope_theta, self.norm_eps, self.chunk_size = rope_theta, norm_eps, chunk_size
        self.qkv = nn.Linear(hidden, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)  # Qwen2 has q/k/v biases
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None  # Qwen3 normalizes q and k per head
        self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        n_la = len(self.split.la_heads)
        self.gdn = (
            GatedDeltaNetHeads(hidden, n_la, head_dim, head_dim, conv_size, output_gate, gdn_gate_bias)
            if n_la
            else None
        )
        if n_la:
            self.head_norm_weight = nn.Parameter(torch.ones(n_heads, head_dim))
            self.head_gamma = nn.Parameter(torch.ones(n_heads))
        # One gather takes every head's q, k, v out of the projection in the order the kernels want them; the
        # parts are then views. Head-level decode is dozens of tiny kernels, so each one saved counts
        # (results/paper-h100/decode-profile.txt).
        H, KV, la_groups = n_heads, n_kv_heads, self.split.la_kv_groups()
        self.slot_order = (*self.split.fa_heads, *(H + g for g in self.split.fa_groups),
                           *(H + KV + g for g in self.split.fa_groups), *self.split.la_heads,
                           *(H + g for g in la_groups), *(H + KV + g for g in la_groups))  # fmt: skip
        self.head_order = (*self.split.fa_heads, *self.split.la_heads)  # the kernels' outputs, concatenated
        self.gathers_slots = self.slot_order != tuple(range(H + 2 * KV))  # False for a plain MHA or GDN layer
        self.reorders_heads = self.head_order != tuple(range(n_heads))
        # The fused path's slots: FA q, FA groups' k, GDN q, the other groups' k and v, FA groups' v: the qkv
        # rows once each (the floor's GEMM), so that RoPE takes one run (FA q and k), Qwen3's q/k norms one run
        # (every q and k) and the GDN heads' q, k, v are adjacent where each has a KV group of its own. GDN heads
        # that share a group (GQA) take its k and v by one gather of [T, 2 n_la d]: repeating the group's rows per
        # head made the GEMM a third wider (Qwen3-1.7B head 7:1: 8000 rows against 5952, 2.70 ms at 64K on an H200).
        fa_groups = self.split.fa_groups
        other = tuple(g for g in range(KV) if g not in fa_groups)  # groups of GDN heads only
        fused_slots = (*self.split.fa_heads, *(H + g for g in fa_groups), *self.split.la_heads, *(H + g for g in other),
                       *(H + KV + g for g in other), *(H + KV + g for g in fa_groups))  # fmt: skip
        self.fused_rows = tuple(s * head_dim + i for s in fused_slots for i in range(head_dim))
        self.fused_qk_kinds = tuple(int(s >= H) for s in fused_slots[: n_heads + KV])
        # per GDN head, the positions of its q, k and v among the fused slots
        bases = ((0, self.split.la_heads), (H, la_groups), (H + KV, la_groups))
        self.gdn_slots = tuple(tuple(fused_slots.index(base + g) for g in groups) for base, groups in bases)
        self.slot_plans = {joined: self._slot_plan(joined) for joined in (False, True)}
        self.fa_plan = self._slot_plan(False, gdn=False) if self.n_fa else None  # with slot_conv for the GDN heads
        self.kernel_columns = tuple(h * head_dim + i for h in self.head_order for i in range(head_dim))
        self._fused_cache = None  # (parameter versions, fused weights) while they hold

    def _slot_plan(self, joined: bool, gdn: bool = True) -> glue.SlotPlan:
        """Where the fused path's q, k and v come from (glue.slot_norm_rope): the FA heads' q and their groups' k
        slots, normed and rotated, as two parts (under autograd each its own output, whose gradient then comes back
        alone); `joined` (decode), their groups' v slots as they are as a third part, so that the op writes the new
        token's k and v into the KV cache (prefill takes v as a view of the projection and writes the cache once);
        then, with `gdn`, the GDN heads' q, k and v, each head's from its own slot or its group's (q and k normed), as
        three parts (prefill: each the dense tensor its conv takes) or, `joined`, one (decode: one conv update over q,
        k and v)."""
        n_groups = len(self.split.fa_groups) if self.n_fa else 0
        n_rope = self.n_fa + n_groups
        sources, kinds = list(range(n_rope)), list(self.fused_qk_kinds[:n_rope])
        sizes = [self.n_fa, n_groups] if n_rope else []
        if joined and n_groups:  # the FA groups' v: the last fused slots
            n_slots = len(self.fused_rows) // self.head_dim
            sources, kinds = sources + list(range(n_slots - n_groups, n_slots)), kinds + [2] * n_groups
            sizes.append(n_groups)
        if self.gdn is not None and gdn:
            for kind, slots in enumerate(self.gdn_slots):  # q: 0, k: 1, v: 2 (not normed)
                sources, kinds = sources + list(slots), kinds + [kind] * len(slots)
            sizes += [3 * self.gdn.n_heads] if joined else [self.gdn.n_heads] * 3
        return glue.SlotPlan(tuple(sources), tuple(kinds), tuple(sizes), n_rope)

    @property
    def n_fa(self) -> int:
        """Number of FA heads."""
        return len(self.split.fa_heads)

    @property
    def _qk_eps(self) -> float:
        """Qwen3's q/k norms' eps (0 without them: unread)."""
        return self.q_norm.eps if self.q_norm is not None else 0.0

    def _core(self, pass_: str, device: torch.device, dtype: torch.dtype) -> HybridCore:
        """The head-level core of a pass ("prefill", "train", "decode") on the device's type for activations of
        `dtype`, made once: `auto` picks by dtype too (cuDNN attention takes no fp32)."""
        key = (device.type, pass_, dtype)
        if key not in self._cores:
            name = dtype_name(dtype)
            fa = registry.layer_backend(self.fa_backend, registry.FA, device.type, pass_, name) if self.n_fa else None
            gdn = registry.layer_backend(self.gdn_backend, registry.GDN, device.type, pass_, name) if self.gdn else None
            self._cores[key] = HybridCore(fa, gdn, self.mode, self.chunk_size)
        return self._cores[key]

    def _glue_ops(self, core: HybridCore, device: torch.device) -> glue.GlueOps | None:
        """The fused path's ops, or None for the reference glue (GLUES says which)."""
        if self.glue == "reference":
            return None
        if self.glue == "auto" and not (
            device.type == "cuda"
            and glue.fla_available()
            and (core.gdn_backend is None or core.gdn_backend.name in FUSED_GDN_BACKENDS)
        ):
            return None
        return glue.fla_ops() if device.type == "cuda" else glue.TORCH

    def _fused_weights(self) -> "FusedWeights":
        """The weights of the fused path (_make_fused_weights). Made once and kept while the parameters hold
        (inference), made outside inference mode so that a later call under autograd (a frozen layer whose input
        takes gradients) may save them for its backward; made on every call from the parameters when autograd tracks
        them (training), so that their gradients flow. In-place changes that no version counter records are not seen:
        writes through `.data`, and to parameters made in inference mode (inference tensors have no version counter)."""
        params = tuple(self.parameters())
        if grad_flows(*params):
            self._fused_cache = None
            return self._make_fused_weights()
        key = tuple((p.data_ptr(), None if p.is_inference() else p._version, p.dtype) for p in params)
        if self._fused_cache is None or self._fused_cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                self._fused_cache = (key, self._make_fused_weights())
        return self._fused_cache[1]

    def _make_fused_weights(self) -> "FusedWeights":
        """_folded_weights (a layer without GDN heads uses its parameters as they are) and Qwen3's q and k norm
        weights."""
        device = self.qkv.weight.device
        qk_norm = torch.stack([self.q_norm.weight, self.k_norm.weight]) if self.q_norm is not None else None
        if self.gdn is None:  # a plain attention layer: its slots are the qkv rows in order, its heads have no norms
            parts = (self.qkv.weight, self.qkv.bias, self.o_proj.weight, self.o_proj.weight.shape[1], None)
        else:
            parts = self._folded_weights(device)
        return FusedWeights(*parts, qk_norm)

    def _folded_weights(self, device):
        """A layer with GDN heads: its weights with the head order folded in (indexing weights, not activations):
        one input projection, the qkv rows in the fused slots' order followed by the GDN heads' a and b rows, zero
        rows and output-gate rows, with its bias; o_proj's columns in the kernels' head order (the FA heads' first),
        each scaled by its head's norm weight times gamma (the norms then have no weight), and how many are the FA
        heads'; the GDN conv taps of q, k, v together: FusedWeights' fields but the last."""
        gdn = self.gdn
        rows = head_index(self.fused_rows, device)
        # a and b, then zero rows up to a multiple of 64, then the output gate's rows (whole heads, last: under
        # autograd a GEMM of their own, _fused_inputs): every view of the projection then starts and strides on
        # 16-byte bounds (cuDNN attention reads the FA heads' v in place and gives wrong results on unaligned strides;
        # head 7:1 of Qwen3-1.7B had a 7708-wide row).
        pad = -(len(self.fused_rows) + 2 * gdn.n_heads) % 64
        projs = (gdn.a_proj, gdn.b_proj, None, *((gdn.g_proj,) if gdn.g_proj is not None else ()))  # None: zero rows
        sizes = (len(self.fused_rows), *(pad if p is None else p.out_features for p in projs))
        zeros = self.qkv.weight.new_zeros(pad, self.hidden)
        weight = torch.cat([self.qkv.weight.index_select(0, rows), *(zeros if p is None else p.weight for p in projs)])
        bias = None
        if self.qkv.bias is not None or any(p is not None and p.bias is not None for p in projs):
            parts = [self.qkv.bias.index_select(0, rows) if self.qkv.bias is not None else None]
            parts += [None if p is None else p.bias for p in projs]
            bias = torch.cat([weight.new_zeros(n) if b is None else b for b, n in zip(parts, sizes, strict=True)])
        scale = (self.head_norm_weight * self.head_gamma[:, None]).index_select(0, head_index(self.head_order, device))
        o_weight = self.o_proj.weight.index_select(1, head_index(self.kernel_columns, device)) * scale.flatten()
        conv = gdn.conv_weight() if gdn.conv_size else None
        return weight, bias, o_weight, self.n_fa * self.head_dim, conv

    def _project(self, x) -> torch.Tensor:
        """The fused projection as head slots [B, T, H + 2 KV, d]: query heads, key groups, value groups."""
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv_heads
        slots = self.qkv(x).view(B, T, H + 2 * KV, self.head_dim)
        if self.q_norm is not None:
            slots = torch.cat(
                [self.q_norm(slots[:, :, :H]), self.k_norm(slots[:, :, H : H + KV]), slots[:, :, H + KV :]], 2
            )
        return slots

    def _split_inputs(self, slots, position_embeddings):
        """(q, k, v of the FA heads with RoPE, or None; [B, T, 3 n_la, d] q, k, v of the GDN heads, or None)."""
        if self.gathers_slots:
            slots = slots.index_select(2, head_index(self.slot_order, slots.device))
        n_fa, n_groups = self.n_fa, len(self.split.fa_groups)
        fa = None
        if n_fa:
            qk = apply_rope(slots[:, :, : n_fa + n_groups], *position_embeddings)
            fa = (qk[:, :, :n_fa], qk[:, :, n_fa:], slots[:, :, n_fa + n_groups : n_fa + 2 * n_groups])
        return fa, (slots[:, :, n_fa + 2 * n_groups :] if self.gdn is not None else None)

    def _expand_for_kernel(self, k_fa, v_fa):
        if self.split.fa_gqa_uniform:
            return k_fa, v_fa
        index = head_index(self.split.fa_kv_index(), k_fa.device)
        return select_slots(k_fa, index), select_slots(v_fa, index)

    def _cached_kv(self, cache: LayerCache, length: int):
        """A decode step's FA k and v: the cache's first `length` tokens, expanded for the kernel; copied where
        autograd records the cache and nothing else copies them, as the FA backward may save its inputs as they are
        (SDPA saves views where it needs no copy: one KV group) and the next step's write in place would change them
        (backward then raised)."""
        k, v = cache.k[:, :length], cache.v[:, :length]
        if self.split.fa_gqa_uniform and torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            k, v = k.clone(), v.clone()
        return self._expand_for_kernel(k, v)

    def _finish(self, fa_out, la_out, x):
        """Per-head norms and gate, heads back in order, output projection. fa_out/la_out: [B, T, n, d]."""
        if self.gdn is None:
            o = fa_out  # a plain attention layer: every head is FA, in order
        else:
            n_fa = self.n_fa
            la_out = la_out.to(x.dtype)
            o = la_out if fa_out is None else torch.cat([fa_out, la_out], dim=2)  # kernel order: FA, then GDN
            scale = self.head_norm_weight * self.head_gamma[:, None]
            if self.reorders_heads:
                scale = scale.index_select(0, head_index(self.head_order, x.device))
            o = head_rms_norm(o, scale, self.norm_eps)  # per head: the heads' order does not matter
            if self.gdn.g_proj is not None:
                gated = self.gdn.output_gate(o[:, :, n_fa:], x)
                o = torch.cat([o[:, :, :n_fa], gated], dim=2) if n_fa else gated
            if self.reorders_heads:
                o = o.index_select(2, head_index(self.split.original_positions(), x.device))
        return self.o_proj(o.reshape(*x.shape[:2], -1))

    def forward(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, hidden]. With a cache holding tokens, x continues them (decode: one token, T = 1); a cache with
        none is filled by this prefill. `position_embeddings` = (cos, sin) as Hugging Face passes them; else made
        here. Raises ValueError for a continuation of more than one token or past a full KV cache (ensure_capacity)."""
        if cache is not None and cache.length > 0:
            if x.shape[1] != 1:  # the decode step's shapes hold one token (more failed deep inside, or not at all)
                raise ValueError(f"a cached layer decodes one token a call, got {x.shape[1]}")
            return self._decode(x, position_embeddings, cache)
        core = self._core("train" if torch.is_grad_enabled() else "prefill", x.device, _kernel_dtype(x))
        ops = self._glue_ops(core, x.device)
        if ops is not None:
            return self._prefill_fused(x, position_embeddings, cache, core, ops)
        if position_embeddings is None and self.n_fa:
            position_embeddings = rope_cos_sin(
                torch.arange(x.shape[1], device=x.device), self.head_dim, self.rope_theta, x.dtype
            )
        fa, la = self._split_inputs(self._project(x), position_embeddings)
        gdn = conv_states = None
        if fa:
            q_fa, k_fa, v_fa = fa
            fa = (q_fa, *self._expand_for_kernel(k_fa, v_fa))
            if cache is not None:
                cache.k[:, : x.shape[1]], cache.v[:, : x.shape[1]] = k_fa, v_fa
        if la is not None:
            gdn, conv_states = self.gdn.prepare(la, x)
        fa_out, gdn_result = core.prefill_parts(fa, gdn, output_final_state=cache is not None)
        la_out, state = gdn_result if gdn_result is not None else (None, None)
        if cache is not None:
            cache.state, cache.conv, cache.length = state, conv_states, x.shape[1]
        return self._finish(fa_out, la_out, x)

    def new_cache(self, batch: int, max_length: int, device, dtype) -> LayerCache:
        """An empty LayerCache for `batch` sequences of up to `max_length` tokens: K and V buffers
        [batch, max_length, FA KV groups, head_dim] (None without FA heads); GDN state and conv state come with the
        prefill."""
        groups = len(self.split.fa_groups)
        shape = (batch, max_length, groups, self.head_dim)
        k = torch.zeros(shape, device=device, dtype=dtype) if groups else None
        v = torch.zeros(shape, device=device, dtype=dtype) if groups else None
        return LayerCache(k, v, 0, None, None)

    def _decode(self, x, position_embeddings, cache: LayerCache):
        """A decode step, either glue. Raises ValueError where the KV cache is full (an empty slice at the position
        took the new token's k and v by broadcasting, and the step attended without them)."""
        position = cache.length
        if cache.k is not None and position >= cache.k.shape[1]:
            raise ValueError(
                f"the layer's KV cache holds {cache.k.shape[1]} tokens and is full: grow it "
                f"(LayerCache.ensure_capacity) before decoding token {position + 1}"
            )
        core = self._core("decode", x.device, _kernel_dtype(x))
        ops = self._glue_ops(core, x.device)
        if ops is not None:
            return self._decode_fused(x, position_embeddings, cache, core, ops)
        if position_embeddings is None and self.n_fa:
            position_embeddings = rope_cos_sin(
                torch.arange(position, position + 1, device=x.device), self.head_dim, self.rope_theta, x.dtype
            )
        fa, la = self._split_inputs(self._project(x), position_embeddings)
        gdn = new_conv = None
        if fa:
            q_fa, k_new, v_new = fa
            for at, new in zip(cache.kv_at(position), (k_new, v_new), strict=True):
                at.copy_(new)
            fa = (q_fa, *self._cached_kv(cache, position + 1))
        if la is not None:
            (gq, gk, gv, g, beta), new_conv = self.gdn.prepare(la, x, cache.conv)
            gdn = (gq[:, 0], gk[:, 0], gv[:, 0], g[:, 0], beta[:, 0], cache.state)
        fa_out, gdn_result = core.decode_parts(fa, gdn)
        la_out, state = gdn_result if gdn_result is not None else (None, None)
        cache.length, cache.state, cache.conv = position + 1, state, new_conv
        return self._finish(fa_out, la_out, x)

    # The fused path: the same math as the reference methods above, composed from glue.py's ops.

    def _fused_inputs(
        self, x, position_embeddings, weights: FusedWeights, start: int, ops, joined: bool, kv=None, gdn_as_slots=False
    ):  # fmt: skip
        """The one input projection -> (FA q, k, v with RoPE at positions start.., or None; the GDN heads' q, k, v
        channels: three [B, T, n_la d], or with `joined` one [B, T, 3 n_la d], or with `gdn_as_slots` the projection's
        head slots [B, T, S, d] as they are (for slot_conv, which gathers and norms them itself); their a and b
        [B, T, n_la]; their output gate [B, T, n_la, d] or None; the last four None without GDN heads). The q and k
        slots are rewritten (norms, RoPE) and the GDN heads' q, k and v gathered; the rest are views of the
        projection. With `joined` and FA heads, `kv` may give the FA k and v's destinations ([B, T, G, d] each with
        contiguous slots: decode's KV cache slices), which the op writes and which stand for them in the result."""
        B, T, _ = x.shape
        n_la = self.gdn.n_heads if self.gdn is not None else 0
        gated = self.gdn is not None and self.gdn.g_proj is not None
        n_main = weights.projection.shape[0] - (n_la * self.head_dim if gated else 0)  # the rows before the gate's
        # Under autograd the gate by a GEMM of its own: fla's gated norm would copy its strided view. Without, one GEMM
        # as the floor's (head_norms reads the gate strided): two GEMMs read x twice, the second on a narrow output.
        if gated and B * T > 1 and grad_flows(x, weights.projection, weights.bias):
            out, gate = (F.linear(x, weights.projection[rows], None if weights.bias is None else weights.bias[rows])
                         for rows in (slice(n_main), slice(n_main, None)))  # fmt: skip
        else:
            out = F.linear(x, weights.projection, weights.bias)
            gate = out[..., n_main:] if gated else None
        gate = gate.view(B, T, n_la, self.head_dim) if gated else None
        return (*self._prepared_inputs(out, position_embeddings, weights, start, ops, joined, kv, gdn_as_slots), gate)

    def _prepared_inputs(
        self, out, position_embeddings, weights: FusedWeights, start: int, ops, joined: bool, kv, gdn_as_slots: bool
    ):  # fmt: skip
        """_fused_inputs' outputs but the gate, from the projection's output `out` [B, T, W]: the rewritten and
        gathered slots by one op (glue.slot_norm_rope: one kernel on CUDA, and one for its backward, where fla's ops
        took an RMSNorm, a multiply, a RoPE and gathers, each pass but the gathers after a copy of its strided input),
        with `joined` the FA groups' v too (into `kv`'s destinations where given), without it the FA groups' v as a
        view, and the GDN heads' a and b views, all by one take_parts (under autograd one node, whose backward makes
        out's gradient in one buffer). With `gdn_as_slots` the plan leaves the GDN heads out (fa_plan; none at all
        without FA heads) and their q, k and v come as the head slots."""
        d, n_fa, n_groups = self.head_dim, self.n_fa, len(self.split.fa_groups)
        n_la = self.gdn.n_heads if self.gdn is not None else 0
        n_slots = len(self.fused_rows) // d
        plan = self.fa_plan if gdn_as_slots else self.slot_plans[joined]
        cos = sin = None
        if plan is not None and plan.n_rope:
            cos, sin = self._rope_tables(position_embeddings, start, out.shape[1], out.dtype, out.device)
        eps = self._qk_eps
        takes = []
        if n_fa and not joined:  # the joined plan takes the FA groups' v as its third part
            takes.append((functools.partial(slot_run, start=n_slots - n_groups, stop=n_slots, head_dim=d), None))
        if n_la:
            column = n_slots * d
            takes += [(lambda t: t[..., column : column + n_la], None),
                      (lambda t: t[..., column + n_la : column + 2 * n_la], None)]  # fmt: skip
        into = None if kv is None else dict(zip((1, 2), kv, strict=True))  # the joined plan's FA k and v parts
        prep = None if plan is None else SlotPrep(ops, plan, n_slots, d, eps, cos, sin)
        parts = take_parts(out, takes, prep, weights.qk_norm, into)
        n_prepared = 0 if plan is None else len(plan.sizes)
        prepared, views = parts[:n_prepared], parts[n_prepared:]  # slot_norm_rope's parts, then the views
        fa = (*prepared[:2], prepared[2] if joined else views[0]) if n_fa else None  # q, k (rotated), v
        if not n_la:
            return fa, None, None, None
        if gdn_as_slots:
            return fa, slot_run(out, 0, n_slots, d), *views[-2:]
        channels, (a, b) = prepared[(3 if joined else 2) if n_fa else 0 :], views[-2:]
        return fa, (channels[0].flatten(2) if joined else tuple(c.flatten(2) for c in channels)), a, b

    def _rope_tables(self, position_embeddings, start: int, T: int, dtype, device):
        """RoPE's half tables (cos, sin) for positions start..start+T-1 in `dtype`: [T, d / 2] rows of the shared
        rope_table, or of the (cos, sin) Hugging Face passed ([T, d] or [1, T, d]; rotate-half tables hold each half
        twice, so the first half is the half table); per-sequence tables [B, T, d] give [B, T, d / 2]."""
        half = self.head_dim // 2
        if position_embeddings is None:
            cos, sin = rope_table(start + T, self.head_dim, self.rope_theta, device, dtype)
            return cos[start : start + T], sin[start : start + T]
        cos, sin = position_embeddings
        if cos.dim() == 3 and cos.shape[0] > 1:
            return cos[..., :half].to(dtype), sin[..., :half].to(dtype)
        return tuple(t.reshape(T, -1)[:, :half].to(dtype) for t in (cos, sin))

    def _prefill_fused(self, x, position_embeddings, cache: LayerCache | None, core: HybridCore, ops):
        T = x.shape[1]
        weights = self._fused_weights()
        # Where no gradient flows into the GDN heads' inputs, one op (slot_conv) takes them from the projection's slots
        # to the GDN kernel's q, k and v, the L2 norm included; under autograd, slot_norm_rope's parts, fla's convs and
        # the GDN kernel's L2 norm, whose backwards exist.
        slot_conv = self._slot_conv_applies(x, weights)
        fa, channels, a, b, gate = self._fused_inputs(
            x, position_embeddings, weights, 0, ops, joined=False, gdn_as_slots=slot_conv
        )
        if fa:
            q_fa, k_fa, v_fa = fa
            if cache is not None:
                cache.k[:, :T], cache.v[:, :T] = k_fa, v_fa
            fa = (q_fa, *self._expand_for_kernel(k_fa, v_fa))
        gdn = conv_state = None
        if channels is not None:
            gdn, conv_state = self._gdn_prefill_inputs(channels, a, b, cache is not None, ops, weights, slot_conv)
        fa_out, gdn_result = core.prefill_parts(fa, gdn, output_final_state=cache is not None, qk_l2norm=not slot_conv)
        la_out, state = gdn_result if gdn_result is not None else (None, None)
        if cache is not None:
            cache.state, cache.conv, cache.length = state, conv_state, T
        return self._finish_fused(fa_out, la_out, gate, weights, ops)

    def _slot_conv_applies(self, x, weights: FusedWeights) -> bool:
        """Whether a prefill takes the GDN heads' inputs by slot_conv (no backward): a layer with GDN heads and a conv
        whose input, projection, q/k norm and conv taps all need no gradient."""
        if self.gdn is None or not self.gdn.conv_size:
            return False
        return not grad_flows(x, weights.projection, weights.bias, weights.qk_norm, weights.conv)

    def _gdn_prefill_inputs(self, channels, a, b, final_state: bool, ops, weights: FusedWeights, slot_conv: bool):
        """The GDN heads' q, k, v channels (three [B, T, n_la d]; with `slot_conv` the projection's head slots
        [B, T, S, d], which slot_conv gathers, norms, convolves and L2-normalizes, and whose kernel also computes the
        gates), a and b -> the GDN kernel's (q, k, v, g, beta) and the conv state [B, 3 n_la d, K] with `final_state`
        (else None)."""
        gdn, conv_state = self.gdn, None
        if slot_conv:
            return ops.slot_conv(channels, self.gdn_slots, weights.qk_norm, self._qk_eps, weights.conv, a, b, gdn.A_log,
                                 gdn.dt_bias, final_state)  # fmt: skip
        if gdn.conv_size:  # one conv per q, k and v: each output is then the dense tensor the GDN kernel takes
            convs = [
                ops.conv(c, w, None, final_state)
                for c, w in zip(channels, (gdn.conv_q, gdn.conv_k, gdn.conv_v), strict=True)
            ]
            qkv = [y.unflatten(2, (gdn.n_heads, -1)) for y, _ in convs]
            conv_state = torch.cat([state for _, state in convs], 1) if final_state else None
        else:
            qkv = [F.silu(c).unflatten(2, (gdn.n_heads, -1)) for c in channels]
        # beta in g's dtype (fp32 at least), as GatedDeltaNetHeads.gates, slot_conv and the floor's GDN part give it:
        # FlashQLA compiles its kernels per beta dtype, and a bf16 beta had a training point compile a third set of
        # them for its floor (results/floor-h200-v8) and time the layer on other kernels than the floor
        g = ops.gate(a, gdn.A_log, gdn.dt_bias)
        return (*qkv, g, torch.sigmoid(b.to(g.dtype))), conv_state

    def _decode_fused(self, x, position_embeddings, cache: LayerCache, core: HybridCore, ops):
        """A decode step of the fused path. Its ops (a kernel each on the GPU): the projection GEMM; slot_norm_rope,
        which also writes the new token's FA k and v into the KV cache at its position (without autograd; under it
        take_parts copies them there, so that autograd records the writes; a cache it cannot write, glue.writable,
        takes two copies); the GDN heads' conv update; the FA and GDN steps (core); the heads' norms and o_proj
        (_finish_fused)."""
        position, B = cache.length, x.shape[0]
        weights = self._fused_weights()
        kv = cache.kv_at(position) if self.n_fa else None
        if kv is not None and not all(map(glue.writable, kv)):  # a head-major cache (strided slots): copies, below
            kv = None
        fa, la, a, b, gate = self._fused_inputs(x, position_embeddings, weights, position, ops, joined=True, kv=kv)
        if fa:  # its k and v are now in the cache, or are written there here
            if kv is None:
                for at, new in zip(cache.kv_at(position), fa[1:], strict=True):
                    at.copy_(new)
            fa = (fa[0], *self._cached_kv(cache, position + 1))
        gdn = gates = None
        if la is not None:
            n_la = self.gdn.n_heads
            if self.gdn.conv_size and cache.conv.is_inference() and not torch.is_inference_mode_enabled():
                cache.conv = cache.conv.clone()  # made by a prefill in inference mode: written in place below
            la = ops.conv_update(la, cache.conv, weights.conv) if self.gdn.conv_size else F.silu(la)  # advances conv
            q, k, v = la.view(B, 3 * n_la, -1).split(n_la, dim=1)
            # a and b raw: the GDN step applies the decay gate and beta's sigmoid in its kernel (fla's recurrent
            # step; the torch backends in torch), two kernels fewer than gate and sigmoid of their own
            gdn, gates = (q, k, v, a[:, 0], b[:, 0], cache.state), (self.gdn.A_log, self.gdn.dt_bias)
        fa_out, gdn_result = core.decode_parts(fa, gdn, qk_l2norm=True, gates=gates)
        la_out, state = gdn_result if gdn_result is not None else (None, None)
        cache.length, cache.state = position + 1, state
        return self._finish_fused(fa_out, la_out, gate, weights, ops)

    def _finish_fused(self, fa_out, la_out, gate, weights: FusedWeights, ops: glue.GlueOps):
        """Weightless per-head norms (the scales are in the weights; a layer without GDN heads has none), the GDN
        heads' output gate and the output projection. Without gradients one op (head_norms) normalizes every head into
        one tensor in o_proj's column order, and o_proj is one GEMM. Under autograd fla's gated norm and norm, whose
        backwards exist, then o_proj over the GDN heads' columns and the FA heads' added in place (addmm_: the GEMM's
        own accumulate), so that the heads' outputs are not copied into one tensor."""
        if la_out is None:  # a plain attention layer
            return F.linear(fa_out.flatten(2), weights.o, self.o_proj.bias)
        la_out = la_out.to(weights.o.dtype)
        if not grad_flows(la_out, gate, fa_out):
            return F.linear(ops.head_norms(la_out, gate, fa_out, self.norm_eps).flatten(2), weights.o, self.o_proj.bias)
        o = ops.norm(la_out, self.norm_eps) if gate is None else ops.norm_gated(la_out, gate, self.norm_eps)
        out = F.linear(o.flatten(2), weights.o_gdn, self.o_proj.bias)
        if fa_out is not None:  # under autocast `out` is in its dtype and the weight is not
            fa = ops.norm(fa_out, self.norm_eps).flatten(2).flatten(0, 1).to(out.dtype)
            out.view(-1, out.shape[-1]).addmm_(fa, weights.o_fa.t().to(out.dtype))
        return out
