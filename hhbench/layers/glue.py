"""The glue ops of a HydraHead layer's fused path, one op per function (fla's way): the GDN heads' short causal
conv, its one-token update, the decay gate, the per-head RMS norms (GDN heads' gated by silu) and the FA heads'
RoPE. On CUDA they are fla's Triton kernels; TORCH holds torch ops of the same signatures and math, so that the
fused composition (head order and norm scales folded into the weights, conv states, shapes) is tested on the CPU,
where fla's autotuned kernels cannot run (Triton's interpreter has no benchmarker).

Shapes: conv x [B, T, C] (any strides), weight [C, K], states [B, C, K] in fla's layout (the last K inputs; the
oldest is never read again). gate a [B, T, n] -> log decay, fp32. Norms take o [..., d] and return its dtype.
RoPE takes x [B, T, n, d] and half tables cos, sin [T, d / 2] in x's dtype (fla's layout: Hugging Face's tables hold
each half twice) and returns x's dtype.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    # (x, cos, sin) -> x rotated by RoPE, rotate-half convention
    rope: Callable


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


def rms_norm(o: torch.Tensor, eps: float) -> torch.Tensor:
    """o / rms(o) over the last dim, without weight, computed in fp32 at least; returns o's dtype."""
    wide = o.to(torch.promote_types(o.dtype, torch.float32))
    return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(o.dtype)


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half convention (GPT-NeoX, Llama; Hugging Face's apply_rotary_pos_emb) from half tables:
    x [B, T, n, d] with halves x1, x2 -> [x1 cos - x2 sin, x2 cos + x1 sin]; cos, sin [T, d / 2]."""
    cos, sin = cos[:, None], sin[:, None]
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


TORCH = GlueOps("torch", _torch_conv, _torch_conv_update, gdn_decay, rms_norm, _torch_norm_gated, rope_half)


@functools.cache
def fla_ops() -> GlueOps:
    """fla 0.6's fused kernels (imported on first use: fla needs Triton and a GPU build)."""
    from fla.modules.causal_conv1d import causal_conv1d, causal_conv1d_update
    from fla.modules.norm.fused_norm_gate import rms_norm_gated
    from fla.modules.norm.layernorm import rms_norm as fla_rms_norm
    from fla.modules.rotary import rotary_embedding
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

    # rotary_embedding: one kernel, in fp32 (a strided x is made contiguous first, by fla's input guard)
    return GlueOps("fla", conv, conv_update, fused_gdn_gate, norm, norm_gated, rotary_embedding)


@functools.cache
def fla_available() -> bool:
    """Whether fla's glue kernels import here (fla is hhbench's `gpu` extra)."""
    try:
        fla_ops()
    except ImportError:
        return False
    return True
