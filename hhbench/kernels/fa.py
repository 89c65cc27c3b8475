"""Full-attention backends: torch SDPA with each of its kernels pinned, flash-attn, and FlexAttention."""

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hhbench.kernels.registry import FA, Backend, register


def expand_kv(k: torch.Tensor, q_heads: int) -> torch.Tensor:
    """[B, T, Hkv, d] -> [B, T, Hq, d] for kernels without native GQA (each KV head serves Hq/Hkv query heads)."""
    return k if k.shape[2] == q_heads else k.repeat_interleave(q_heads // k.shape[2], dim=2)


class Sdpa(Backend):
    """torch SDPA (F.scaled_dot_product_attention) pinned to one kernel by sdpa_kernel; the subclasses pick it.
    q [B, T, Hq, d], k, v [B, T, Hkv, d]; K and V are expanded to Hq heads for kernels without native GQA."""

    kernel: SDPBackend
    native_gqa = True  # SDPA's enable_gqa; kernels that lack it get expanded K and V

    def _call(self, q, k, v, causal: bool, kernel: SDPBackend | None = None):
        gqa = k.shape[2] != q.shape[2]
        if gqa and not self.native_gqa:
            k, v = expand_kv(k, q.shape[2]), expand_kv(v, q.shape[2])
            gqa = False
        with sdpa_kernel([kernel or self.kernel]):
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=gqa
            )
        return o.transpose(1, 2)

    def prefill(self, q, k, v):
        """Causal attention: q [B, T, Hq, d], k, v [B, T, Hkv, d] -> o [B, T, Hq, d]. A one-token prefill (generation
        from a one-token prompt, a context-1 point) runs SDPA's math kernel: cuDNN's refuses that call ("No available
        kernel", torch 2.11 on an H200). Its output is its value, but taking the value alone would leave q and k out
        of the autograd graph: their gradients (zero) would be missing, and autograd.grad over them raises."""
        return self._call(q, k, v, causal=True, kernel=SDPBackend.MATH if q.shape[1] == 1 else None)

    def decode(self, q, k_cache, v_cache):
        """One new token: q [B, 1, Hq, d] against whole caches [B, S, Hkv, d] (no mask) -> o [B, 1, Hq, d]."""
        return self._call(q, k_cache, v_cache, causal=False)


def _probe_sdpa(kernel: SDPBackend, device: str):
    def probe():
        q = torch.randn(1, 64, 2, 64, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        with sdpa_kernel([kernel]):
            F.scaled_dot_product_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), is_causal=True)

    return probe


# cuDNN's and the flash kernel's dtypes on sm80 and newer: torch's sdp_utils.cpp (check_dtypes_low_precision); an fp32
# call pinned to either raises "No available kernel".
HALF_DTYPES = ("bf16", "fp16")


@register(
    FA,
    "sdpa-cudnn",
    ("cuda",),
    "torch SDPA, cuDNN attention",
    probe_fn=_probe_sdpa(SDPBackend.CUDNN_ATTENTION, "cuda"),
    dtypes=HALF_DTYPES,
)
class SdpaCudnn(Sdpa):
    """SDPA's cuDNN attention kernel (no native GQA: K and V expanded)."""

    kernel = SDPBackend.CUDNN_ATTENTION
    native_gqa = False


@register(
    FA,
    "sdpa-flash",
    ("cuda",),
    "torch SDPA, FlashAttention-2 kernel",
    probe_fn=_probe_sdpa(SDPBackend.FLASH_ATTENTION, "cuda"),
    dtypes=HALF_DTYPES,
)
class SdpaFlash(Sdpa):
    """SDPA's FlashAttention-2 kernel."""

    kernel = SDPBackend.FLASH_ATTENTION


@register(
    FA,
    "sdpa-efficient",
    ("cuda",),
    "torch SDPA, memory-efficient kernel",
    probe_fn=_probe_sdpa(SDPBackend.EFFICIENT_ATTENTION, "cuda"),
)
class SdpaEfficient(Sdpa):
    """SDPA's memory-efficient kernel (no native GQA: K and V expanded)."""

    kernel = SDPBackend.EFFICIENT_ATTENTION
    native_gqa = False


@register(FA, "sdpa-math", ("cpu", "cuda"), "torch SDPA, math reference (fp32 accumulation)")
class SdpaMath(Sdpa):
    """SDPA's math reference: plain matmuls and softmax, on CPU and CUDA."""

    kernel = SDPBackend.MATH


@register(
    FA, "flash-attn", ("cuda",), "flash-attn package: flash_attn_func, flash_attn_with_kvcache", requires="flash_attn"
)
class FlashAttn(Backend):
    """The flash-attn package (Dao et al.): flash_attn_func for prefill and training, flash_attn_with_kvcache for
    decode; [B, T, H, d] layout natively, GQA included."""

    def prefill(self, q, k, v):
        """Causal flash_attn_func: q [B, T, Hq, d], k, v [B, T, Hkv, d] -> o [B, T, Hq, d]."""
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, causal=True)

    def decode(self, q, k_cache, v_cache):
        """flash_attn_with_kvcache of q [B, 1, Hq, d] over whole caches [B, S, Hkv, d] -> o [B, 1, Hq, d]."""
        from flash_attn import flash_attn_with_kvcache

        return flash_attn_with_kvcache(q, k_cache, v_cache, causal=False)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _causal_mask(length: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, length, length, device=device)


@register(
    FA,
    "flex",
    ("cuda",),
    "FlexAttention (torch.compile'd), causal block mask",
    requires="torch.nn.attention.flex_attention",
    passes=("prefill", "train"),
)
class Flex(Backend):
    """FlexAttention (torch.nn.attention.flex_attention), torch.compile'd once, with a causal block mask cached
    per length; prefill and training only."""

    def prefill(self, q, k, v):
        """Causal flex_attention: q [B, T, Hq, d], k, v [B, T, Hkv, d] -> o [B, T, Hq, d]."""
        mask = _causal_mask(q.shape[1], q.device.type)
        gqa = k.shape[2] != q.shape[2]
        o = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, enable_gqa=gqa)
        return o.transpose(1, 2)
