"""The fused path's input preparation as one Triton kernel: the head slots of the projection's output gathered into
the tensors the attention kernels take, Qwen3's per-head q/k RMSNorm with its weight and the FA heads' RoPE applied
on the way (glue.slot_norm_rope is the torch twin and defines the math).

Composed from fla's ops the same work is an RMSNorm (whose input guard first copies the strided slots), a multiply by
the norm weights, a RoPE (another copy of its strided slots) and gathers of the GDN heads' q, k and v: 4-6 passes
over the slots, 1.4-1.5 ms a Qwen3-1.7B layer at 64K on an H200 (results/floor-h200-v4). This kernel reads each
source slot once per destination and writes the destination once.

One program per (block of tokens, destination slot). With TRITON_INTERPRET=1 set before triton is imported, Triton's
interpreter runs it on CPU tensors: how the tests check it without a GPU.
"""

import torch
import triton
import triton.language as tl

from hhbench.kernels.hybrid import head_index

# 32 tokens of a 128-wide slot a program: its two halves, cos and sin in fp32 are 8 registers a thread each over 4 warps
BLOCK_TOKENS = 32


@triton.jit
def _slot_norm_rope(X, Plan, W, Cos, Sin, Out, n_tokens, T, n_dest, n_rope, stride_xb, stride_xt, stride_xs,
                    stride_cb, stride_ct, eps, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    BLOCK_T: tl.constexpr, NORM: tl.constexpr, COMPUTE: tl.constexpr):  # fmt: skip
    j = tl.program_id(1)
    source = tl.load(Plan + j)
    kind = tl.load(Plan + n_dest + j)
    first = tl.load(Plan + 2 * n_dest + j)  # the destination's part: its first slot and its number of slots
    size = tl.load(Plan + 3 * n_dest + j)
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
    part = Out + first.to(tl.int64) * n_tokens * (2 * HALF)
    o_row = part + tok.to(tl.int64) * size * (2 * HALF) + (j - first) * (2 * HALF)
    tl.store(o_row[:, None] + h[None, :], x1.to(Out.dtype.element_ty), mask=mask)
    tl.store(o_row[:, None] + HALF + h[None, :], x2.to(Out.dtype.element_ty), mask=mask)


def slot_norm_rope(slots, plan, weight, eps, cos, sin):
    """glue.slot_norm_rope's op as one kernel launch: slots [B, T, S, d] (any strides but a contiguous last dim),
    `plan` (glue.SlotPlan), weight [2, d] or None, half tables
    cos, sin [T, d / 2] or [B, T, d / 2] (None without RoPE slots) -> the plan's parts, each [B, T, n, d] contiguous,
    views of one buffer; computed in fp32, in fp64 for fp64 slots (the twin's promote_types). Raises ValueError for a
    strided last dim or an odd d."""
    B, T, _, d = slots.shape
    if slots.stride(-1) != 1 or d % 2:
        raise ValueError(f"slot_norm_rope takes slots with a contiguous, even last dim, not {tuple(slots.stride())}")
    n_tokens, n_dest = B * T, len(plan.sources)
    out = slots.new_empty(n_tokens * n_dest * d)
    if plan.n_rope:
        cos, sin = (c if c.dim() == 3 else c[None] for c in (cos, sin))
        if cos.stride(-1) != 1 or sin.stride() != cos.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        stride_cb, stride_ct = (0 if cos.shape[0] == 1 else cos.stride(0)), cos.stride(1)
    else:
        cos = sin = slots  # not read
        stride_cb = stride_ct = 0
    grid = (triton.cdiv(n_tokens, BLOCK_TOKENS), n_dest)
    _slot_norm_rope[grid](
        slots, head_index(plan.table, slots.device), slots if weight is None else weight, cos, sin, out, n_tokens, T, n_dest, plan.n_rope,
        slots.stride(0), slots.stride(1), slots.stride(2), stride_cb, stride_ct, float(eps), HALF=d // 2,
        BLOCK_HALF=triton.next_power_of_2(d // 2), BLOCK_T=BLOCK_TOKENS, NORM=weight is not None,
        COMPUTE=tl.float64 if slots.dtype == torch.float64 else tl.float32, num_warps=4,
    )  # fmt: skip
    return plan.split(out, B, T, d)
