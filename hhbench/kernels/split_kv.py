"""Split-KV decoding (flash-decoding) over SDPA's flash kernel.

A decode kernel runs one thread block per (sequence, KV head): with a few FA heads at batch 1 that is too few
blocks to read the KV cache at the card's bandwidth (docs/results.md, "Performance targets"). Here the cache is cut
into segments that run as separate batch entries of one flash call; each segment's log-sum-exp weighs its
partial output, which makes the merge exact. The query heads of a KV group ride along as extra query rows of
that group (a decode step is not causal), so GQA costs no copy of K or V.
"""

import functools
import math

import torch

from hhbench.kernels.registry import FA, Backend, register

BLOCKS_PER_SM = 2  # enough segments for two waves of thread blocks
MIN_SEGMENT = 256  # tokens: below this, merging costs more than the added parallelism gains


def attention_with_lse(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention of q [N, h, m, d] over k, v [N, h, L, d]: (o [N, h, m, d], lse [N, h, m] fp32)."""
    if q.device.type == "cuda":
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
    else:
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
    return out[0], out[1]


def n_segments(length: int, pairs: int, target_blocks: int, min_segment: int = MIN_SEGMENT) -> int:
    """Segments for a cache of `length` tokens shared by `pairs` (sequence, KV head) pairs: enough for
    `target_blocks` thread blocks, none shorter than `min_segment` tokens (when the cache allows)."""
    return max(1, min(math.ceil(target_blocks / pairs), length // min_segment))


@functools.cache
def _target_blocks(device: torch.device, per_sm: int = BLOCKS_PER_SM) -> int:
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return torch.get_num_threads()


def split_kv_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, segments: int) -> torch.Tensor:
    """q [B, 1, Hq, d] over caches [B, T, Hkv, d] (query head j reads KV head j // (Hq/Hkv)) -> [B, 1, Hq, d]."""
    B, T, Hkv, d = k_cache.shape
    group = q.shape[2] // Hkv
    length = T // segments
    body = length * segments
    rows = q.reshape(B, Hkv, group, d)
    outs, lses = [], []
    if segments > 1:
        seg_q = rows.unsqueeze(1).expand(B, segments, Hkv, group, d).reshape(B * segments, Hkv, group, d)
        k_seg, v_seg = (c[:, :body].reshape(B * segments, length, Hkv, d).transpose(1, 2) for c in (k_cache, v_cache))
        o, lse = attention_with_lse(seg_q, k_seg, v_seg)
        outs.append(o.view(B, segments, Hkv, group, d))
        lses.append(lse.view(B, segments, Hkv, group))
        rest = slice(body, T)
    else:
        rest = slice(0, T)
    if rest.start < T:  # the tokens left over by whole segments (all of them when there is one segment)
        o, lse = attention_with_lse(rows, k_cache[:, rest].transpose(1, 2), v_cache[:, rest].transpose(1, 2))
        outs.append(o.unsqueeze(1))
        lses.append(lse.unsqueeze(1))
    weights = torch.softmax(torch.cat(lses, dim=1), dim=1)  # exp(lse_s) / sum_s exp(lse_s): exact merge
    merged = (torch.cat(outs, dim=1).float() * weights.unsqueeze(-1)).sum(dim=1)
    return merged.to(q.dtype).reshape(B, 1, Hkv * group, d)


def _probe_flash():
    if not torch.cuda.is_available():
        return  # the CPU path needs nothing beyond torch
    q = torch.randn(1, 2, 1, 64, device="cuda", dtype=torch.bfloat16)
    attention_with_lse(q, q, q)


@register(
    FA,
    "sdpa-split",
    ("cpu", "cuda"),
    "split-KV decode (flash-decoding) over SDPA's flash kernel, segments merged by log-sum-exp",
    passes=("decode",),
    probe_fn=_probe_flash,
)
class SplitKV(Backend):
    """Split-KV decode (flash-decoding, Dao et al. 2023) in torch: the cache is cut into segments, each attended by
    SDPA's flash kernel with its log-sum-exp, and the partial outputs merged exactly. Decode only."""

    def decode(self, q, k_cache, v_cache):
        """q [B, 1, Hq, d] over whole caches [B, S, Hkv, d] -> o [B, 1, Hq, d], in as many segments as fill the
        device (n_segments)."""
        segments = n_segments(k_cache.shape[1], k_cache.shape[0] * k_cache.shape[2], _target_blocks(q.device))
        return split_kv_decode(q, k_cache, v_cache, segments)


def _probe_triton():
    from hhbench.kernels import triton_decode

    q = torch.randn(1, 1, 2, 64, device="cuda", dtype=torch.bfloat16)
    triton_decode.split_kv_decode(q, q, q, _target_blocks(q.device, triton_decode.PROGRAMS_PER_SM), MIN_SEGMENT)


@register(
    FA,
    "triton-split",
    ("cuda",),
    "split-KV decode (flash-decoding) as two Triton kernels: segment partials, then a log-sum-exp merge",
    requires="triton",
    passes=("decode",),
    probe_fn=_probe_triton,
)
class TritonSplitKV(Backend):
    """Split-KV decode (flash-decoding) as two Triton kernels (hhbench.kernels.triton_decode): segment partials,
    then a log-sum-exp merge. Decode only, CUDA."""

    def decode(self, q, k_cache, v_cache):
        """q [B, 1, Hq, d] over whole caches [B, S, Hkv, d] -> o [B, 1, Hq, d], segments sized to fill the GPU's SMs."""
        from hhbench.kernels import triton_decode

        target = _target_blocks(q.device, triton_decode.PROGRAMS_PER_SM)
        return triton_decode.split_kv_decode(q, k_cache, v_cache, target, MIN_SEGMENT)
