"""The fused path's input preparation as one Triton kernel, and its backward as another: the head slots of the
projection's output gathered into the tensors the attention kernels take, Qwen3's per-head q/k RMSNorm with its weight
and the FA heads' RoPE applied on the way (glue.slot_norm_rope is the torch twin and defines the math).

Composed from fla's ops the same work is an RMSNorm (whose input guard first copies the strided slots), a multiply by
the norm weights, a RoPE (another copy of its strided slots) and gathers of the GDN heads' q, k and v: 4-6 passes
over the slots, 1.4-1.5 ms a Qwen3-1.7B layer at 64K on an H200 (results/floor-h200-v4). This kernel reads each
source slot once per destination and writes the destination once.

One program per (block of tokens, destination slot), writing its slot into its part: a part of the kernel's buffer or
a tensor the caller gives (`into`, any batch and token strides), as a decode step's FA k and v parts go straight into
the KV cache's slices at the new token's position (before, two copy kernels a step wrote them there). The backward
kernel (training) runs one program per (block of tokens, source slot the plan reads): it sums the gradients of the
source's destinations (each un-rotated where RoPE'd), takes them back through the norm recomputed from the source, and
writes the source's gradient once, without atomics; the norm weight's gradient comes as sums per program (fp32; fp64
for fp64 slots), added up by torch.

slot_conv (a prefill without gradients) takes the GDN heads' inputs from the projection to what the GDN kernel takes
in one kernel: each head's q, k and v slots read in place, Qwen3's q/k norm, the short causal conv, SiLU and q's and
k's L2 norm, and the decay gate and beta. Composed, the same work is slot_norm_rope's copies of the heads' slots into
dense parts (fla's conv reads them), three fla conv calls, fla's L2 norm of q and of k (the GDN kernel's
use_qk_l2norm_in_kernel), fla's gate and a sigmoid: for head 7:1 of Qwen3-1.7B at 64K about 3.8 GB of traffic against
1.4 GB, and 8 launches against 1, whose Python wrappers made an eager 16K prefill host-bound (fla's conv took 0.64 ms of
host time for its 3 calls, its gate 0.18 ms: results/layer-overhead-h200).

head_norms (a step without gradients) normalizes every head's output in one kernel: the GDN heads' gated by silu of
their output gate, the FA heads' read in place where the attention kernel left them (SDPA's are strided), where fla's
gated norm and its norm took two launches (and the norm a copy of the FA heads' strided output first), whose wrappers
took 0.41 ms of an eager 16K step's host time. It writes all heads into one tensor in o_proj's column order, so that
o_proj is one GEMM, where the GDN heads' GEMM and an accumulate of the FA heads' (addmm_) read and wrote o_proj's
output twice (0.54 GB for head 7:1 of Qwen3-1.7B at 64K).
With TRITON_INTERPRET=1 set before triton is imported, Triton's interpreter runs both on CPU tensors: how the tests
check them without a GPU.
"""

import functools
import itertools

import torch
import triton
import triton.language as tl

from hhbench.kernels.hybrid import head_index, launch_device
from hhbench.layers.glue import L2_EPS

# the kernels compute in the twin's dtype (glue.slot_norm_rope: promote_types with fp32)
_COMPUTE = {torch.float32: tl.float32, torch.float64: tl.float64}
# 32 tokens of a 128-wide slot a program: its two halves, cos and sin in fp32 are 8 registers a thread each over 4 warps
BLOCK_TOKENS = 32
# head_norms reads whole 128-wide slots: 16 tokens a program over 8 warps, one 16-byte load a thread per tile.
# Compiled for sm_90 as a bf16 Qwen3 layer launches it (Triton 3.9, gate on, the arguments' divisibility by 16 that the
# launch specializes; tests/sm90_sass.py) ptxas gives it 31 registers a thread (8 blocks an SM), and every slot moves
# by 16-byte accesses (as in slot_norm_rope, 66 registers, and its backward, 127).
SLOT_BLOCK_TOKENS, SLOT_WARPS = 16, 8
# slot_conv: a program takes 4 runs of 8 tokens of one slot over 2 warps (one 16-byte load a thread per input of the
# 4 runs), and holds each run's 8 + K - 1 inputs in registers, each loaded and q/k-normed once (fla's Gluon conv reuses
# its inputs so, 8 outputs a run). Its first form, one program per 16 tokens over 8 warps whose every output loaded and
# normed its K inputs anew, took 1.67 ms of a head 7:1 prefill at 64K on an H200 where fla's conv over the same channels
# took 0.58 (results/profile-h200-v2); the window took it to 0.92 ms (d111add, results/slot-conv-h200). That form still
# issued one input's load at a time: its norm weight and taps, loaded as [d] vectors, reached the inputs' layout
# through shared memory, two barriers at each of the 11 uses. Loaded as tiles in the inputs' layout, with every input
# load issued before the first norm, the kernel has no barrier and 11 loads in flight a thread: 156 registers a
# thread, no spills (sm_90, as above), 6 blocks of 2 warps an SM. Alone at 64K on an H200 (results/slot-conv-h200-v2)
# it took 0.775 ms as 8 runs over 4 warps (the tiling of results/floor-h200-v10) and 0.678 ms as 4 runs over 2 warps,
# 0.186 and 0.167 ms at 16K (fla's conv 0.525 ms at 64K, 0.300 at 16K): the smaller blocks, as many warps an SM,
# are kept.
CONV_ROWS, CONV_RUN, CONV_WARPS = 4, 8, 2


@triton.jit
def _store_slot(Part, stride_pb, stride_pt, b, t, slot, h, x1, x2, mask, HALF: tl.constexpr):
    """Stores the halves x1, x2 [BLOCK_T, BLOCK_HALF] of tokens (b, t) at slot `slot` of a part [B, T, n, d] with
    batch and token strides stride_pb, stride_pt and contiguous slots, cast to the part's dtype (from the slots')."""
    row = Part + b * stride_pb + t * stride_pt + slot * (2 * HALF)
    tl.store(row[:, None] + h[None, :], x1.to(Part.dtype.element_ty), mask=mask)
    tl.store(row[:, None] + HALF + h[None, :], x2.to(Part.dtype.element_ty), mask=mask)


@triton.jit
def _slot_norm_rope(X, Plan, W, Cos, Sin, P0, P1, P2, P3, P4, n_tokens, T, n_dest, n_rope, stride_xb, stride_xt,
                    stride_xs, stride_cb, stride_ct, stride_0b, stride_0t, stride_1b, stride_1t, stride_2b, stride_2t,
                    stride_3b, stride_3t, stride_4b, stride_4t, eps, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    BLOCK_T: tl.constexpr, NORM: tl.constexpr, COMPUTE: tl.constexpr):  # fmt: skip
    j = tl.program_id(1)
    source = tl.load(Plan + j)
    kind = tl.load(Plan + n_dest + j)
    slot = j - tl.load(Plan + 2 * n_dest + j)  # the destination's slot in its part
    p = tl.load(Plan + 4 * n_dest + j)  # its part: pointer argument P<p>, its strides stride_<p>b, stride_<p>t
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_HALF)
    mask = (tok < n_tokens)[:, None] & (h < HALF)[None, :]
    b = (tok // T).to(tl.int64)  # offsets of long sequences overflow int32
    t = (tok % T).to(tl.int64)
    x_row = X + b * stride_xb + t * stride_xt + source * stride_xs
    x1 = tl.load(x_row[:, None] + h[None, :], mask=mask, other=0.0).to(COMPUTE)
    x2 = tl.load(x_row[:, None] + HALF + h[None, :], mask=mask, other=0.0).to(COMPUTE)
    if NORM:
        if kind < 2:  # 0: a q slot, 1: a k slot (the weight's row); 2: taken as it is
            # a root and a division a token: tl.rsqrt may lower to an approximate root in fp64 too
            rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
            w1 = tl.load(W + kind * 2 * HALF + h, mask=h < HALF, other=0.0).to(COMPUTE)
            w2 = tl.load(W + kind * 2 * HALF + HALF + h, mask=h < HALF, other=0.0).to(COMPUTE)
            x1 = x1 * rstd[:, None] * w1[None, :]
            x2 = x2 * rstd[:, None] * w2[None, :]
    if j < n_rope:
        table = b * stride_cb + t * stride_ct
        cos = tl.load(Cos + table[:, None] + h[None, :], mask=mask, other=0.0).to(COMPUTE)
        sin = tl.load(Sin + table[:, None] + h[None, :], mask=mask, other=0.0).to(COMPUTE)
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    # in the slots' dtype, as the twin's parts (and the prefill's cache writes): a wider cache (fp32 under autocast)
    # then holds the same values whichever path wrote them
    x1, x2 = x1.to(X.dtype.element_ty), x2.to(X.dtype.element_ty)
    # a store a part, not a pointer picked from the arguments: the parts' dtypes may differ (a KV cache's)
    if p == 0:
        _store_slot(P0, stride_0b, stride_0t, b, t, slot, h, x1, x2, mask, HALF)
    if p == 1:
        _store_slot(P1, stride_1b, stride_1t, b, t, slot, h, x1, x2, mask, HALF)
    if p == 2:
        _store_slot(P2, stride_2b, stride_2t, b, t, slot, h, x1, x2, mask, HALF)
    if p == 3:
        _store_slot(P3, stride_3b, stride_3t, b, t, slot, h, x1, x2, mask, HALF)
    if p == 4:
        _store_slot(P4, stride_4b, stride_4t, b, t, slot, h, x1, x2, mask, HALF)


def _check_layout(*slots):
    """Raises ValueError unless each tensor of head slots [..., d] has a contiguous, even last dim (the kernels read
    each slot's halves as two runs)."""
    for t in slots:
        if t.stride(-1) != 1 or t.shape[-1] % 2:
            raise ValueError(f"slot_norm_rope takes slots with a contiguous, even last dim, not {tuple(t.stride())}")


# the kernels' pointer arguments for the parts (the forward's outputs, the backward's gradients): a layer's plan has
# up to 5 parts (prefill's FA q, FA k, GDN q, k, v; decode's FA q, k, v and the GDN heads' q, k, v joined)
MAX_PARTS = 5


def _norm_weight(weight, d: int):
    """The q/k norm weight as the kernels read it: None, or [2, d] made contiguous (they index row r at r d). Raises
    ValueError for another shape."""
    if weight is None:
        return None
    if weight.shape != (2, d):
        raise ValueError(f"the q/k norm weight is [2, d] = [2, {d}], not {list(weight.shape)}")
    return weight.contiguous()


def _check_parts(plan):
    """Raises ValueError for a plan of more than MAX_PARTS parts."""
    if len(plan.sizes) > MAX_PARTS:
        raise ValueError(f"slot_norm_rope's kernels take plans of up to {MAX_PARTS} parts, not {len(plan.sizes)}")


def _compute_dtype(slots) -> torch.dtype:
    """The dtype the kernels compute in: the twin's (promote_types with fp32), fp64 for fp64 slots."""
    return torch.promote_types(slots.dtype, torch.float32)


def slot_norm_rope(slots, plan, weight, eps, cos, sin, into=None):
    """glue.slot_norm_rope's op as one kernel launch: slots [B, T, S, d] (any strides but a contiguous last dim),
    `plan` (glue.SlotPlan), weight [2, d] or None, half tables cos, sin [T, d / 2] or [B, T, d / 2] (None without
    RoPE slots), `into` None or {part index: destination} -> the plan's parts, each [B, T, n, d]: the destinations
    (slots' dtype values written in theirs, with any batch and token strides: decode's KV cache slices), the others
    contiguous views of one buffer; computed in fp32, in fp64 for fp64 slots (the twin's promote_types). Raises
    ValueError for a strided last dim, an odd d, a weight not [2, d], a plan of more than MAX_PARTS parts or a
    destination that is not one of its parts' shape with contiguous slots or that overlaps slots' memory or another
    destination's (glue.SlotPlan.check_into)."""
    B, T, _, d = slots.shape
    _check_layout(slots)
    _check_parts(plan)
    weight = _norm_weight(weight, d)
    into = into or {}
    plan.check_into(into, slots)
    n_tokens, n_dest = B * T, len(plan.sources)
    own = [p for p in range(len(plan.sizes)) if p not in into]  # the parts in the buffer, in order
    buffer = slots.new_empty(n_tokens * d * sum(plan.sizes[p] for p in own))
    views = buffer.split([n_tokens * plan.sizes[p] * d for p in own])
    parts = {**into, **{p: view.view(B, T, plan.sizes[p], d) for p, view in zip(own, views, strict=True)}}
    parts = [parts[p] for p in range(len(plan.sizes))]
    cos, sin, stride_cb, stride_ct = _rope_strides(cos if plan.n_rope else None, sin, slots)
    grid = (triton.cdiv(n_tokens, BLOCK_TOKENS), n_dest)
    unused = MAX_PARTS - len(parts)  # pointer arguments of no part: never stored to
    with launch_device(slots):
        _slot_norm_rope[grid](
            slots, head_index(plan.table, slots.device), slots if weight is None else weight, cos, sin,
            *parts, *[parts[0]] * unused, n_tokens, T, n_dest, plan.n_rope, slots.stride(0), slots.stride(1),
            slots.stride(2), stride_cb, stride_ct, *(s for part in parts for s in part.stride()[:2]), *[0, 0] * unused,
            float(eps), HALF=d // 2, BLOCK_HALF=triton.next_power_of_2(d // 2), BLOCK_T=BLOCK_TOKENS,
            NORM=weight is not None, COMPUTE=_COMPUTE[_compute_dtype(slots)], num_warps=4,
        )  # fmt: skip
    return tuple(parts)


@triton.jit
def _part_grad(p, G0, G1, G2, G3, G4):
    """The gradient of part p: one pointer argument a part, as a table of pointers made per call would be a copy to
    the GPU inside a CUDA graph's capture (training steps are captured)."""
    part = G0
    if p == 1:
        part = G1
    if p == 2:
        part = G2
    if p == 3:
        part = G3
    if p == 4:
        part = G4
    return part


@triton.jit
def _slot_norm_rope_backward(X, Plan, Inverse, W, Cos, Sin, G0, G1, G2, G3, G4, DX, DW, n_tokens, T, n_read, n_dest,
                             n_rope, stride_xb, stride_xt, stride_xs, stride_cb, stride_ct, stride_db, stride_dt,
                             stride_ds, eps, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                             FAN_OUT: tl.constexpr, NORM: tl.constexpr, COMPUTE: tl.constexpr):  # fmt: skip
    i = tl.program_id(1)
    kind = tl.load(Inverse + i)
    source = tl.load(Inverse + n_read + i)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_HALF)
    mask = (tok < n_tokens)[:, None] & (h < HALF)[None, :]
    b = (tok // T).to(tl.int64)
    t = (tok % T).to(tl.int64)
    # the gradient reaching the source: its destinations' gradients, each rotated back where RoPE'd (RoPE's transpose)
    g1 = tl.zeros([BLOCK_T, BLOCK_HALF], dtype=COMPUTE)
    g2 = tl.zeros([BLOCK_T, BLOCK_HALF], dtype=COMPUTE)
    for f in tl.static_range(FAN_OUT):
        j = tl.load(Inverse + (2 + f) * n_read + i)
        if j >= 0:  # destination j's gradient: its part's [B, T, n, d] (contiguous), at j's slot in it
            first = tl.load(Plan + 2 * n_dest + j)
            size = tl.load(Plan + 3 * n_dest + j)
            part = _part_grad(tl.load(Plan + 4 * n_dest + j), G0, G1, G2, G3, G4)
            row = part + tok.to(tl.int64) * size * (2 * HALF) + (j - first) * (2 * HALF)
            d1 = tl.load(row[:, None] + h[None, :], mask=mask, other=0.0).to(COMPUTE)
            d2 = tl.load(row[:, None] + HALF + h[None, :], mask=mask, other=0.0).to(COMPUTE)
            if j < n_rope:
                table = b * stride_cb + t * stride_ct
                cos = tl.load(Cos + table[:, None] + h[None, :], mask=mask, other=0.0).to(COMPUTE)
                sin = tl.load(Sin + table[:, None] + h[None, :], mask=mask, other=0.0).to(COMPUTE)
                d1, d2 = d1 * cos + d2 * sin, d2 * cos - d1 * sin
            g1 += d1
            g2 += d2
    if NORM:
        dw1 = tl.zeros([BLOCK_HALF], dtype=COMPUTE)
        dw2 = tl.zeros([BLOCK_HALF], dtype=COMPUTE)
        if kind < 2:  # y = xhat w with xhat = x rstd: dw = sum gy xhat, dx = rstd (dxhat - xhat mean(dxhat xhat))
            x_row = X + b * stride_xb + t * stride_xt + source * stride_xs
            x1 = tl.load(x_row[:, None] + h[None, :], mask=mask, other=0.0).to(COMPUTE)
            x2 = tl.load(x_row[:, None] + HALF + h[None, :], mask=mask, other=0.0).to(COMPUTE)
            rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)  # as the forward
            # rows past the last token are zeros: their 1 / sqrt(eps), inf for an eps of 0 (a config may set it),
            # times 0 made the weight's partial sums NaN
            rstd = tl.where(tok < n_tokens, rstd, 0.0)
            x1 = x1 * rstd[:, None]
            x2 = x2 * rstd[:, None]
            w1 = tl.load(W + kind * 2 * HALF + h, mask=h < HALF, other=0.0).to(COMPUTE)
            w2 = tl.load(W + kind * 2 * HALF + HALF + h, mask=h < HALF, other=0.0).to(COMPUTE)
            dw1 = tl.sum(g1 * x1, 0)
            dw2 = tl.sum(g2 * x2, 0)
            g1 = g1 * w1[None, :]
            g2 = g2 * w2[None, :]
            mean = (tl.sum(g1 * x1, 1) + tl.sum(g2 * x2, 1)) / (2 * HALF)
            g1 = (g1 - x1 * mean[:, None]) * rstd[:, None]
            g2 = (g2 - x2 * mean[:, None]) * rstd[:, None]
        dw_row = DW + (tl.program_id(0) * n_read + i).to(tl.int64) * (2 * HALF)
        tl.store(dw_row + h, dw1, mask=h < HALF)
        tl.store(dw_row + HALF + h, dw2, mask=h < HALF)
    dx_row = DX + b * stride_db + t * stride_dt + source * stride_ds
    tl.store(dx_row[:, None] + h[None, :], g1.to(DX.dtype.element_ty), mask=mask)
    tl.store(dx_row[:, None] + HALF + h[None, :], g2.to(DX.dtype.element_ty), mask=mask)


def _rope_strides(cos, sin, fallback):
    """(cos, sin, stride over sequences, stride over tokens) of half tables [T, d / 2] or [B, T, d / 2] as the kernels
    read them (a table of one sequence has stride 0 over sequences); without tables `fallback` stands in, unread."""
    if cos is None:
        return fallback, fallback, 0, 0
    cos, sin = (c if c.dim() == 3 else c[None] for c in (cos, sin))
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, (0 if cos.shape[0] == 1 else cos.stride(0)), cos.stride(1)


def slot_norm_rope_backward(grads, slots, plan, weight, eps, cos, sin, grad_slots):
    """glue.slot_norm_rope_backward's op as one kernel launch and a sum: grads, the gradients of slot_norm_rope's parts
    (each [B, T, n, d], made contiguous where they are not) -> writes the gradient of slots [B, T, S, d] at the slots
    the plan reads (plan.read) into grad_slots (slots' shape and dtype, any strides but a contiguous last dim; its
    other slots are left as they are) and returns weight's gradient [2, d] in weight's dtype (None without weight).
    Deterministic (no atomics), and without copies to the GPU (CUDA graphs capture it). Raises ValueError for a
    strided last dim, an odd d, a weight not [2, d] or a plan of more than MAX_PARTS parts."""
    B, T, _, d = slots.shape
    _check_layout(slots, grad_slots)
    _check_parts(plan)
    weight = _norm_weight(weight, d)
    grads = [g.contiguous() for g in grads]
    n_tokens, fan_out, inverse = B * T, *plan.inverse
    n_read, n_blocks = len(plan.read), triton.cdiv(B * T, BLOCK_TOKENS)
    compute = _compute_dtype(slots)
    partial = None if weight is None else slots.new_empty(n_blocks, n_read, d, dtype=compute)
    cos, sin, stride_cb, stride_ct = _rope_strides(cos if plan.n_rope else None, sin, slots)
    with launch_device(slots):
        _slot_norm_rope_backward[(n_blocks, n_read)](
            slots, head_index(plan.table, slots.device), head_index(inverse, slots.device),
            slots if weight is None else weight, cos, sin, *grads, *[grads[0]] * (MAX_PARTS - len(grads)), grad_slots,
            grad_slots if partial is None else partial, n_tokens, T, n_read, len(plan.sources), plan.n_rope,
            slots.stride(0), slots.stride(1), slots.stride(2),
            stride_cb, stride_ct, grad_slots.stride(0), grad_slots.stride(1), grad_slots.stride(2), float(eps),
            HALF=d // 2, BLOCK_HALF=triton.next_power_of_2(d // 2), BLOCK_T=BLOCK_TOKENS, FAN_OUT=fan_out,
            NORM=weight is not None, COMPUTE=_COMPUTE[compute], num_warps=4,
        )  # fmt: skip
    if weight is None:
        return None
    n_q, n_k = (inverse[:n_read].count(kind) for kind in (0, 1))  # the read sources are q, k, then v slots
    rows = (partial[:, :n_q], partial[:, n_q : n_q + n_k])  # index_add_ would add by atomics on CUDA
    return torch.stack([row.sum((0, 1)) for row in rows]).to(weight.dtype)


@triton.jit
def _slot_conv(X, Sources, W, CW, Out, State, A, Bp, A_log, Dt_bias, G, Beta, T, n_heads, stride_xb, stride_xt,
               stride_xs, stride_ab, stride_at, stride_bb, stride_bt, eps, l2_eps, D: tl.constexpr,
               BLOCK_D: tl.constexpr, K: tl.constexpr, ROWS: tl.constexpr, RUN: tl.constexpr, NORM: tl.constexpr,
               STATE: tl.constexpr, COMPUTE: tl.constexpr):  # fmt: skip
    j = tl.program_id(1)  # the destination slot: the q heads', then the k heads', then the v heads'
    b = tl.program_id(2).to(tl.int64)
    kind = j // n_heads  # 0: q, 1: k, 2: v, the part it is written to
    source = tl.load(Sources + j)
    # ROWS runs of RUN consecutive tokens: row r outputs tokens start[r] .. start[r] + RUN - 1 from the RUN + K - 1
    # inputs before them, each loaded and normalized once and held in registers (the window)
    start = tl.program_id(0) * (ROWS * RUN) + tl.arange(0, ROWS) * RUN
    c = tl.arange(0, BLOCK_D)
    # the channels as a [ROWS, BLOCK_D] tile: the weights below load in the inputs' layout, which a [BLOCK_D] vector
    # would have to reach through shared memory and a barrier at every use
    cols = c[None, :] + tl.zeros([ROWS, 1], dtype=tl.int32)
    x_row = X + b * stride_xb + source * stride_xs
    if NORM:  # Qwen3's q_norm weight for q slots, k_norm's for k slots
        w = tl.load(W + tl.minimum(kind, 1) * D + cols, mask=cols < D, other=0.0).to(COMPUTE)
    taps = ()
    for i in tl.static_range(K):
        taps += (tl.load(CW + (j * D + cols) * K + i, mask=cols < D, other=0.0).to(COMPUTE),)
    loaded = ()  # every input of the runs in flight at once, before the first norm waits on one
    for i in tl.static_range(RUN + K - 1):  # input i of a row is token start + i - (K - 1); before the first: zeros
        at = start + (i - (K - 1))
        mask = ((at >= 0) & (at < T))[:, None] & (cols < D)
        loaded += (tl.load(x_row + at.to(tl.int64)[:, None] * stride_xt + cols, mask=mask, other=0.0),)
    window = ()
    for i in tl.static_range(RUN + K - 1):
        at = start + (i - (K - 1))
        valid = (at >= 0) & (at < T)
        x = loaded[i].to(COMPUTE)
        if NORM:
            if kind < 2:
                rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
                x = x * tl.where(valid, rstd, 0.0)[:, None] * w  # a zero row's 1 / sqrt(eps) is inf for eps 0
        # the conv's input in the slots' dtype, as slot_norm_rope's parts hold it and the conv state keeps it
        x = x.to(X.dtype.element_ty)
        window += (x,)
        if STATE:
            # the row's own token: column K - T + at of the state [B, 3 n D, K] (the last K inputs). Only a program
            # holding one of the last K tokens stores: the store's layout conversion costs a barrier in every other
            if i >= K - 1 and (tl.program_id(0) + 1) * (ROWS * RUN) > T - K:
                column = at - (T - K)
                into = ((column >= 0) & (at < T))[:, None] & (cols < D)
                state = State + b * (3 * n_heads * D * K) + (j * D + cols) * K + column[:, None]
                tl.store(state, x.to(State.dtype.element_ty), mask=into)
    if kind == 0:  # head j's gates at these tokens: g = -exp(A_log) softplus(a + dt_bias) (fla's softplus), sigmoid(b)
        t = tl.program_id(0) * (ROWS * RUN) + tl.arange(0, ROWS * RUN)
        gates = b * T + t.to(tl.int64)
        a = tl.load(A + b * stride_ab + t.to(tl.int64) * stride_at + j, mask=t < T, other=0.0).to(COMPUTE)
        a += tl.load(Dt_bias + j).to(COMPUTE)
        softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))
        tl.store(G + gates * n_heads + j, -tl.exp(tl.load(A_log + j).to(COMPUTE)) * softplus, mask=t < T)
        beta = tl.load(Bp + b * stride_bb + t.to(tl.int64) * stride_bt + j, mask=t < T, other=0.0).to(COMPUTE)
        tl.store(Beta + gates * n_heads + j, 1.0 / (1.0 + tl.exp(-beta)), mask=t < T)
    n_tokens = tl.num_programs(2) * T
    for r in tl.static_range(RUN):
        acc = tl.zeros([ROWS, BLOCK_D], dtype=COMPUTE)
        for i in tl.static_range(K):  # output token start + r reads inputs r .. r + K - 1 of its row's window
            acc += window[r + i].to(COMPUTE) * taps[i]
        y = acc / (1.0 + tl.exp(-acc))  # SiLU
        if kind < 2:
            y = y / tl.maximum(tl.sqrt(tl.sum(y * y, 1)), l2_eps)[:, None]  # F.normalize's
        t = start + r
        row = Out + (kind * n_tokens + b * T + t.to(tl.int64)) * (n_heads * D) + (j - kind * n_heads) * D
        tl.store(row[:, None] + cols, y.to(Out.dtype.element_ty), mask=(t < T)[:, None] & (cols < D))


def slot_conv(slots, sources, weight, eps, conv_weight, a, b, A_log, dt_bias, output_final_state=False):
    """glue.slot_conv's op as one kernel launch (no backward: for a prefill without gradients): slots [B, T, S, d] (any
    strides but a contiguous last dim: the projection's output, read in place), sources = (q, k, v), each the n GDN
    heads' source slots, weight [2, d] or None, conv_weight [3 n d, K], a and b [B, T, n] (any batch and token strides
    but a contiguous last dim: the projection's columns), A_log and dt_bias [n] -> ((q, k, v [B, T, n, d], contiguous
    views of one buffer in slots' dtype, q and k L2-normalized; g, beta [B, T, n]), the conv's final state
    [B, 3 n d, K] in slots' dtype with output_final_state, else None); computed, and g and beta given, in fp32 (fp64 for
    fp64 slots). Raises ValueError for a strided last dim, conv taps, gate inputs or a weight of another shape or
    sources of uneven lengths, IndexError for a source outside S."""
    B, T, S, d = slots.shape
    n, K = len(sources[0]), conv_weight.shape[-1]
    weight = _norm_weight(weight, d)
    if len(sources) != 3 or any(len(heads) != n for heads in sources):  # the kernel reads 3 n entries of the table
        raise ValueError(f"slot_conv takes sources (q, k, v) of one length each, not {sources}")
    if slots.stride(-1) != 1 or a.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError("slot_conv takes slots and gate inputs with a contiguous last dim")
    if conv_weight.shape != (3 * n * d, K):
        raise ValueError(f"slot_conv takes conv taps [3 n d, K] = [{3 * n * d}, K], not {tuple(conv_weight.shape)}")
    if a.shape != (B, T, n) or b.shape != (B, T, n) or A_log.shape != (n,) or dt_bias.shape != (n,):
        raise ValueError(f"slot_conv takes gate inputs a, b [B, T, n] = {[B, T, n]} and A_log, dt_bias [{n}]")
    table = tuple(itertools.chain(*sources))
    if not all(0 <= s < S for s in table):  # the kernel would read outside the slots
        raise IndexError(f"slot_conv's sources {sources} name slots outside the {S} slots")
    compute = _compute_dtype(slots)
    out = slots.new_empty(3, B, T, n, d)
    gates = slots.new_empty(2, B, T, n, dtype=compute)
    state = slots.new_zeros(B, 3 * n * d, K) if output_final_state else None
    with launch_device(slots):
        _slot_conv[(triton.cdiv(T, CONV_ROWS * CONV_RUN), 3 * n, B)](
            slots, head_index(table, slots.device), slots if weight is None else weight, conv_weight.contiguous(), out,
            out if state is None else state, a, b, A_log, dt_bias, gates[0], gates[1], T, n, slots.stride(0),
            slots.stride(1), slots.stride(2), a.stride(0), a.stride(1), b.stride(0), b.stride(1), float(eps), L2_EPS,
            D=d, BLOCK_D=triton.next_power_of_2(d), K=K, ROWS=CONV_ROWS, RUN=CONV_RUN, NORM=weight is not None,
            STATE=output_final_state, COMPUTE=_COMPUTE[compute], num_warps=CONV_WARPS,
        )  # fmt: skip
    return (*out.unbind(0), *gates.unbind(0)), state


@triton.jit
def _head_norms(La, Gate, Fa, Out, n_tokens, T, n_la, n_fa, stride_ob, stride_ot, stride_oh, stride_gb, stride_gt,
                stride_gh, stride_fb, stride_ft, stride_fh, eps, D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_T: tl.constexpr, GATED: tl.constexpr, COMPUTE: tl.constexpr):  # fmt: skip
    h = tl.program_id(1)  # the GDN heads, then the FA heads; Out holds the FA heads first (kernel head order)
    # each branch loads its own: La and Fa may differ in dtype (autocast), and Triton will not merge their pointers
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_D)
    mask = (tok < n_tokens)[:, None] & (c < D)[None, :]
    b = (tok // T).to(tl.int64)
    t = (tok % T).to(tl.int64)
    if h < n_la:
        x = tl.load(La + (b * stride_ob + t * stride_ot + h * stride_oh)[:, None] + c[None, :], mask=mask, other=0.0)
        x = x.to(COMPUTE)
        y = x / tl.sqrt(tl.sum(x * x, 1) / D + eps)[:, None]
        if GATED:
            gate_row = b * stride_gb + t * stride_gt + h * stride_gh
            g = tl.load(Gate + gate_row[:, None] + c[None, :], mask=mask, other=0.0).to(COMPUTE)
            y = y * (g / (1.0 + tl.exp(-g)))
        into = n_fa + h
    else:
        f = h - n_la
        x = tl.load(Fa + (b * stride_fb + t * stride_ft + f * stride_fh)[:, None] + c[None, :], mask=mask, other=0.0)
        x = x.to(COMPUTE)
        y = x / tl.sqrt(tl.sum(x * x, 1) / D + eps)[:, None]
        into = f
    row = Out + (tok.to(tl.int64) * (n_la + n_fa) + into) * D
    tl.store(row[:, None] + c[None, :], y.to(Out.dtype.element_ty), mask=mask)


def head_norms(o_la, gate, o_fa, eps):
    """glue.head_norms' op as one kernel launch (no backward: for a step without gradients): o_la [B, T, n_la, d],
    gate of its shape or None, o_fa [B, T, n_fa, d] or None, each with any strides but a contiguous last dim (SDPA's
    output is strided) -> every head's normalized output in one contiguous [B, T, n_fa + n_la, d] in o_la's dtype, the
    FA heads first (o_fa by its RMS over d), then the GDN heads (o_la by its RMS over d, times silu(gate)): the kernel
    head order of the fused o_proj's columns, which then runs as one GEMM. Computed in fp32 (fp64 for fp64 inputs).
    Raises ValueError for a strided last dim or tensors of other shapes."""
    B, T, n_la, d = o_la.shape
    present = [t for t in (o_la, gate, o_fa) if t is not None]
    if any(t.stride(-1) != 1 for t in present):
        raise ValueError("head_norms takes head outputs and gates with a contiguous last dim")
    if (gate is not None and gate.shape != o_la.shape) or (
        o_fa is not None and (*o_fa.shape[:2], o_fa.shape[3]) != (B, T, d)
    ):
        raise ValueError(f"head_norms takes a gate of o_la's shape {tuple(o_la.shape)} and o_fa [B, T, n_fa, d] alike")
    n_fa = 0 if o_fa is None else o_fa.shape[2]
    out = torch.empty(B, T, n_fa + n_la, d, dtype=o_la.dtype, device=o_la.device)
    gate_strides = (0, 0, 0) if gate is None else gate.stride()[:3]
    fa_strides = (0, 0, 0) if o_fa is None else o_fa.stride()[:3]
    compute = functools.reduce(torch.promote_types, [t.dtype for t in present], torch.float32)
    with launch_device(o_la):
        _head_norms[(triton.cdiv(B * T, SLOT_BLOCK_TOKENS), n_la + n_fa)](
            o_la, o_la if gate is None else gate, o_la if o_fa is None else o_fa, out, B * T, T, n_la, n_fa,
            *o_la.stride()[:3], *gate_strides, *fa_strides, float(eps), D=d, BLOCK_D=triton.next_power_of_2(d),
            BLOCK_T=SLOT_BLOCK_TOKENS, GATED=gate is not None, COMPUTE=_COMPUTE[compute], num_warps=SLOT_WARPS,
        )  # fmt: skip
    return out
