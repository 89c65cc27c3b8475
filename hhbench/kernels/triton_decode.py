"""Split-KV decoding (flash-decoding) as two Triton kernels.

One program per (KV segment, sequence, KV head) reads its segment of the cache once for every query head of the
KV group (GQA without copies) and writes a partial output with its log-sum-exp; a second kernel merges the
segments of each query head, weighing them by exp(lse). Against `sdpa-split` (the same idea over SDPA) this
costs two launches instead of a dozen, which is what a decode step of a few FA heads cannot afford.

With TRITON_INTERPRET=1 set before triton is imported, Triton's interpreter runs the kernels on CPU tensors:
how the tests check them on a machine without a GPU.
"""

import math

import torch
import triton
import triton.language as tl

from hhbench.kernels.hybrid import launch_device
from hhbench.kernels.split_kv import n_segments

MAX_SEGMENTS = 128  # the merge holds all segments of one head in registers
# Tuned on an H100 over 4-32 heads at 32K-128K (results/gpu-targets-h100/decode_tuning.json): within 3.3% of the
# best of 36 configurations at every shape, with one program per SM.
DEFAULT_CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 3}
PROGRAMS_PER_SM = 1


@triton.jit
def _partial(Q, K, V, O_part, Lse_part, stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb,
             stride_vt, stride_vh, length, segment_len, segments, scale, HKV: tl.constexpr, GROUP: tl.constexpr,
             BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):  # fmt: skip
    segment = tl.program_id(0)
    b = (tl.program_id(1) // HKV).to(tl.int64)  # offsets of long caches overflow int32
    kv_head = tl.program_id(1) % HKV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g  # query head j reads KV head j // GROUP
    in_group = g < GROUP
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=in_group[:, None], other=0.0)
    start = segment * segment_len
    end = tl.minimum(start + segment_len, length)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scores
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    for offset in range(0, segment_len, BLOCK_N):  # the last segment may end early: its tail is masked
        t = (start + offset + n).to(tl.int64)
        valid = t < end
        k = tl.load(k_base + t[:, None] * stride_kt + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        rescale = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        denom = denom * rescale + tl.sum(p, 1)
        v = tl.load(v_base + t[:, None] * stride_vt + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    rows = (b * HKV * GROUP + heads) * segments + segment  # partials laid out [B * Hq, segments, D]
    tl.store(O_part + rows[:, None] * D + d[None, :], acc / denom[:, None], mask=in_group[:, None])
    tl.store(Lse_part + rows, m + tl.log(denom), mask=in_group)


@triton.jit
def _merge(O_part, Lse_part, Out, stride_ob, stride_oh, segments, HQ: tl.constexpr, BLOCK_S: tl.constexpr,
           D: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)  # b * HQ + query head
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    present = s < segments
    lse = tl.load(Lse_part + row * segments + s, mask=present, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, 0))
    weights = weights / tl.sum(weights, 0)
    parts = tl.load(O_part + (row * segments + s)[:, None] * D + d[None, :], mask=present[:, None], other=0.0)
    out = tl.sum(parts * weights[:, None], 0)
    tl.store(Out + (row // HQ) * stride_ob + (row % HQ) * stride_oh + d, out.to(Out.dtype.element_ty))


def plan_segments(length: int, pairs: int, target_blocks: int, block_n: int, min_segment: int) -> tuple[int, int]:
    """(segments, tokens per segment) for a cache of `length` tokens read by `pairs` (sequence, KV head) pairs:
    enough segments for `target_blocks` programs, none shorter than `min_segment` tokens (when the cache allows),
    segment lengths a multiple of block_n, and no empty segment."""
    wanted = min(n_segments(length, pairs, target_blocks, min_segment), MAX_SEGMENTS)
    segment_len = math.ceil(math.ceil(length / wanted) / block_n) * block_n
    return math.ceil(length / segment_len), segment_len


def split_kv_decode(q, k_cache, v_cache, target_blocks: int, min_segment: int, config: dict = DEFAULT_CONFIG):
    """q [B, 1, Hq, d] over caches [B, T, Hkv, d] (query head j reads KV head j // (Hq/Hkv)) -> [B, 1, Hq, d]."""
    B, T, Hkv, D = k_cache.shape
    Hq = q.shape[2]
    group = Hq // Hkv
    q, k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cache, v_cache))
    segments, segment_len = plan_segments(T, B * Hkv, target_blocks, config["block_n"], min_segment)
    o_part = torch.empty(B * Hq, segments, D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B * Hq, segments, device=q.device, dtype=torch.float32)
    out = torch.empty(B, 1, Hq, D, device=q.device, dtype=q.dtype)
    with launch_device(q):
        _partial[(segments, B * Hkv)](
            q, k_cache, v_cache, o_part, lse_part, q.stride(0), q.stride(2), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), T, segment_len, segments,
            1.0 / math.sqrt(D), HKV=Hkv, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
            BLOCK_N=config["block_n"], D=D, num_warps=config["num_warps"], num_stages=config["num_stages"],
        )  # fmt: skip
        block_s = triton.next_power_of_2(segments)
        _merge[(B * Hq,)](
            o_part,
            lse_part,
            out,
            out.stride(0),
            out.stride(2),
            segments,
            HQ=Hq,
            BLOCK_S=block_s,
            D=D,
            num_warps=4 if block_s <= 32 else 8,
        )
    return out
