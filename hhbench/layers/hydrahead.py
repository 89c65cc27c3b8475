"""The HydraHead attention layer: one fused QKV projection; FA heads through an FA backend (with RoPE and their
KV groups), GDN heads through a GDN backend with GDN's parametrization; every head's output RMS-normalized and
scaled by a learned per-head gamma (GDN heads also output-gated); heads back in their original order; output
projection. A layer with no GDN head is a plain attention layer (no head norms), so an all-FA plan is the
vanilla model and layer-wise FA layers are untouched; a layer with no FA head is a full GDN layer.
"""

from dataclasses import dataclass

import torch
from torch import nn

from hhbench.kernels import registry
from hhbench.kernels.hybrid import SEQUENTIAL, HeadSplit, HybridCore, head_index, merge_heads
from hhbench.layers.gdn_heads import GatedDeltaNetHeads


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary tables (rotate-half convention, as Hugging Face writes them): [T, head_dim] each."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, n, d]; cos, sin [T, d] or [B, T, d]."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def head_rms_norm(o: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """o [B, T, n, d] normalized per head, times that head's weight [n, d] and gamma [n]."""
    normed = o.float() * torch.rsqrt(o.float().pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (weight.float() * gamma.float()[:, None])).to(o.dtype)


@dataclass
class LayerCache:
    """Decoding state of one layer: RoPE'd K and V of the FA groups, GDN state and conv states."""

    k: torch.Tensor | None  # [B, S_max, fa_groups, d]
    v: torch.Tensor | None
    length: int  # tokens held
    state: torch.Tensor | None  # [B, n_la, dk, dv], fp32
    conv: list | None  # q, k, v conv states [B, C, K-1]
    advance: bool = True  # False in benchmarks: every step overwrites the same slot (static shapes, graphs)

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
        fa_backend: str = "auto",
        gdn_backend: str = "auto",
        mode: str = SEQUENTIAL,
        rope_theta: float = 10000.0,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        qkv_bias: bool = False,
        o_bias: bool = False,
        gdn_gate_bias: bool = False,
    ):
        super().__init__()
        self.hidden, self.n_heads, self.n_kv_heads, self.head_dim = hidden, n_heads, n_kv_heads, head_dim
        self.split = HeadSplit(n_heads, tuple(sorted(fa_heads)), n_heads // n_kv_heads)
        self.fa_backend, self.gdn_backend, self.mode = fa_backend, gdn_backend, mode
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

    @property
    def n_fa(self) -> int:
        return len(self.split.fa_heads)

    def _core(self, pass_: str, device: torch.device) -> HybridCore:
        fa = registry.resolve(self.fa_backend, registry.FA, device.type, pass_) if self.n_fa else None
        gdn = registry.resolve(self.gdn_backend, registry.GDN, device.type, pass_) if self.gdn else None
        return HybridCore(self.split, fa, gdn, self.mode, self.chunk_size)

    def _project(self, x):
        B, T, _ = x.shape
        H, KV, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * d, KV * d, KV * d], dim=-1)
        q, k, v = q.view(B, T, H, d), k.view(B, T, KV, d), v.view(B, T, KV, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _fa_inputs(self, q, k, v, cos, sin):
        device = q.device
        q_fa = apply_rope(q.index_select(2, head_index(self.split.fa_heads, device)), cos, sin)
        groups = head_index(self.split.fa_groups, device)
        k_fa = apply_rope(k.index_select(2, groups), cos, sin)
        v_fa = v.index_select(2, groups)
        return q_fa, k_fa, v_fa

    def _expand_for_kernel(self, k_fa, v_fa):
        if self.split.fa_gqa_uniform:
            return k_fa, v_fa
        index = head_index(self.split.fa_kv_index(), k_fa.device)
        return k_fa.index_select(2, index), v_fa.index_select(2, index)

    def _gdn_inputs(self, q, k, v, x, conv_states=None):
        device = q.device
        groups = head_index(self.split.la_kv_groups(), device)
        q_la = q.index_select(2, head_index(self.split.la_heads, device))
        return self.gdn.prepare(q_la, k.index_select(2, groups), v.index_select(2, groups), x, conv_states)

    def _finish(self, fa_out, la_out, x):
        """Per-head norms and gate, heads back in order, output projection. fa_out/la_out: [B, T, n, d]."""
        if self.gdn is not None:
            weight, gamma, device = self.head_norm_weight, self.head_gamma, x.device
            if fa_out is not None:
                fa_idx = head_index(self.split.fa_heads, device)
                fa_out = head_rms_norm(fa_out, weight[fa_idx], gamma[fa_idx], self.norm_eps)
            la_idx = head_index(self.split.la_heads, device)
            la_out = head_rms_norm(la_out.to(x.dtype), weight[la_idx], gamma[la_idx], self.norm_eps)
            la_out = self.gdn.output_gate(la_out, x)
        o = merge_heads(self.split, fa_out, la_out)
        return self.o_proj(o.reshape(*x.shape[:2], -1))

    def forward(
        self,
        x: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, hidden]. With a cache holding tokens, x continues them (decode); a cache with none is filled
        by this prefill. `position_embeddings` = (cos, sin) as Hugging Face passes them; else made here."""
        if cache is not None and cache.length > 0:
            return self._decode(x, position_embeddings, cache)
        core = self._core("train" if torch.is_grad_enabled() else "prefill", x.device)
        q, k, v = self._project(x)
        if position_embeddings is None:
            position_embeddings = rope_cos_sin(
                torch.arange(x.shape[1], device=x.device), self.head_dim, self.rope_theta, x.dtype
            )
        cos, sin = position_embeddings
        fa = gdn = None
        if self.n_fa:
            q_fa, k_fa, v_fa = self._fa_inputs(q, k, v, cos, sin)
            fa = (q_fa, *self._expand_for_kernel(k_fa, v_fa))
            if cache is not None:
                cache.k[:, : x.shape[1]], cache.v[:, : x.shape[1]] = k_fa, v_fa
        conv_states = None
        if self.gdn is not None:
            gdn, conv_states = self._gdn_inputs(q, k, v, x)
        fa_out, gdn_result = core.prefill_parts(fa, gdn, output_final_state=cache is not None)
        la_out, state = gdn_result if gdn_result is not None else (None, None)
        if cache is not None:
            cache.state, cache.conv, cache.length = state, conv_states, x.shape[1]
        return self._finish(fa_out, la_out, x)

    def new_cache(self, batch: int, max_length: int, device, dtype) -> LayerCache:
        groups = len(self.split.fa_groups)
        shape = (batch, max_length, groups, self.head_dim)
        k = torch.zeros(shape, device=device, dtype=dtype) if groups else None
        v = torch.zeros(shape, device=device, dtype=dtype) if groups else None
        return LayerCache(k, v, 0, None, None)

    def _decode(self, x, position_embeddings, cache: LayerCache):
        core = self._core("decode", x.device)
        position = cache.length
        q, k, v = self._project(x)
        if position_embeddings is None:
            position_embeddings = rope_cos_sin(
                torch.arange(position, position + 1, device=x.device), self.head_dim, self.rope_theta, x.dtype
            )
        cos, sin = position_embeddings
        fa = gdn = None
        if self.n_fa:
            q_fa, k_new, v_new = self._fa_inputs(q, k, v, cos, sin)
            cache.k[:, position : position + 1], cache.v[:, position : position + 1] = k_new, v_new
            k_all, v_all = self._expand_for_kernel(cache.k[:, : position + 1], cache.v[:, : position + 1])
            fa = (q_fa, k_all, v_all)
        new_conv = None
        if self.gdn is not None:
            (gq, gk, gv, g, beta), new_conv = self._gdn_inputs(q, k, v, x, cache.conv)
            gdn = (gq[:, 0], gk[:, 0], gv[:, 0], g[:, 0], beta[:, 0], cache.state)
        fa_out, gdn_result = core.decode_parts(fa, gdn)
        la_out, state = gdn_result if gdn_result is not None else (None, None)
        if cache.advance:
            cache.length, cache.state, cache.conv = position + 1, state, new_conv
        return self._finish(fa_out, la_out, x)
