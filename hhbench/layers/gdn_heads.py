"""Gated DeltaNet's parametrization for the GDN heads of one layer: decay gate, beta, short causal conv and
output gate (as in fla's GatedDeltaNet layer and Qwen3-Next). The heads' q/k/v come from the layer's own
projection; this module turns them into what a GDN kernel takes."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from hhbench.kernels.reference import gdn_decay
from hhbench.layers.glue import causal_conv


class GatedDeltaNetHeads(nn.Module):
    """The GDN parametrization of `n_heads` heads with key width `dk` and value width `dv`: decay gate (A_log,
    dt_bias, a_proj), beta (b_proj), short causal conv of `conv_size` taps (0: none) and output gate, as fla's
    GatedDeltaNet layer (Gated DeltaNet, Yang et al. 2024). `gate_bias` gives beta and the output gate biases."""

    def __init__(
        self,
        hidden: int,
        n_heads: int,
        dk: int,
        dv: int,
        conv_size: int = 4,
        output_gate: bool = True,
        gate_bias: bool = False,
    ):
        super().__init__()
        self.n_heads, self.dk, self.dv, self.conv_size = n_heads, dk, dv, conv_size
        self.a_proj = nn.Linear(hidden, n_heads, bias=False)  # decay gate input
        # gate_bias gives beta's and the output gate's projections a bias: a head converted from a trained model
        # starts with zero weights there, and only a bias can then set beta and the gate to chosen constants.
        self.b_proj = nn.Linear(hidden, n_heads, bias=gate_bias)  # beta
        self.g_proj = nn.Linear(hidden, n_heads * dv, bias=gate_bias) if output_gate else None
        # Decay init as fla/Mamba2: A in [1, 16), dt log-uniform in [1e-3, 1e-1], dt_bias = softplus^-1(dt).
        self.A_log = nn.Parameter(torch.empty(n_heads).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(n_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        if conv_size:
            self.conv_q = nn.Parameter(torch.empty(n_heads * dk, conv_size))
            self.conv_k = nn.Parameter(torch.empty(n_heads * dk, conv_size))
            self.conv_v = nn.Parameter(torch.empty(n_heads * dv, conv_size))
            for weight in (self.conv_q, self.conv_k, self.conv_v):
                nn.init.uniform_(weight, -1 / math.sqrt(conv_size), 1 / math.sqrt(conv_size))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log decay g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b), [B, T, n], in fp32 at least."""
        g = gdn_decay(self.a_proj(x), self.A_log, self.dt_bias)
        return g, torch.sigmoid(self.b_proj(x).to(g.dtype))

    def prepare(self, qkv, x, conv_state=None):
        """qkv [B, T, 3n, d]: the heads' q, k and v from the projection (each head its KV group's k and v), with
        dk = dv = d -> kernel inputs (q, k, v, g, beta) and the conv state to carry into decoding: [B, 3 n d, K],
        the q, k and v channels together in fla's layout (None without a conv)."""
        B, T = qkv.shape[:2]
        flat = qkv.reshape(B, T, -1)
        if self.conv_size:  # one depthwise conv over the q, k and v channels together
            flat, conv_state = causal_conv(flat, self.conv_weight(), conv_state)
        else:
            flat = F.silu(flat)
        q, k, v = flat.view(B, T, 3 * self.n_heads, -1).split(self.n_heads, dim=2)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g, beta = self.gates(x)
        return (q, k, v.contiguous(), g, beta), conv_state

    def conv_weight(self) -> torch.Tensor:
        """[3 n d, K]: the q, k and v channels' conv taps, in the order of the conv state's channels."""
        return torch.cat([self.conv_q, self.conv_k, self.conv_v])

    def output_gate(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o [B, T, n, dv] scaled by silu of the gate projection (after the per-head norm)."""
        if self.g_proj is None:
            return o
        return o * F.silu(self.g_proj(x)).view(*o.shape)
