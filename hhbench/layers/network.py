"""A whole hybrid network from a ModelShape and a LayerPlan: pre-norm blocks of HydraAttention and a gated MLP,
embedding and LM head (the `model` scope). Attention-only shapes (no vocab, no MLP, like h32d128) take and
return hidden states."""

import torch
from torch import nn

from hhbench.errors import Unsupported
from hhbench.layers.hydrahead import HydraAttention, LayerCache
from hhbench.spec.layout import LayerPlan


def shape_attention(plan: LayerPlan, fa_heads, fa_backend="auto", gdn_backend="auto", mode="sequential"):
    """The HydraAttention of one layer of plan.shape with full attention on heads `fa_heads` and GDN heads as
    plan.spec.gdn sets them, with the shape's own q/k norms (Qwen3) and projection biases (Qwen2), so that a point
    measures the named model's attention glue, not a plainer one. Backends and mode as HydraAttention takes them."""
    shape, gdn = plan.shape, plan.spec.gdn
    return HydraAttention(shape.hidden, shape.n_heads, shape.n_kv_heads, shape.head_dim, fa_heads, gdn.conv_size,
                          gdn.output_gate, gdn.chunk_size, fa_backend, gdn_backend, mode, qk_norm=shape.qk_norm,
                          qkv_bias=shape.qkv_bias, o_bias=shape.o_bias)  # fmt: skip


class GatedMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)), x [B, T, hidden] -> [B, T, hidden]; gate and up are one GEMM;
    `bias`: biases on all three (Llama's mlp_bias)."""

    def __init__(self, hidden: int, width: int, bias: bool = False):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * width, bias=bias)
        self.down = nn.Linear(width, hidden, bias=bias)

    def forward(self, x):
        """x [B, T, hidden] -> [B, T, hidden]."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


class Block(nn.Module):
    """A pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)) where the shape has an MLP (GatedMLP, with
    biases where `mlp_bias`)."""

    def __init__(self, attention: HydraAttention, hidden: int, mlp_hidden: int, eps: float, mlp_bias: bool = False):
        super().__init__()
        self.attn_norm = nn.RMSNorm(hidden, eps=eps)
        self.attention = attention
        self.mlp_norm = nn.RMSNorm(hidden, eps=eps) if mlp_hidden else None
        self.mlp = GatedMLP(hidden, mlp_hidden, mlp_bias) if mlp_hidden else None

    def forward(self, x, cache: LayerCache | None = None):
        """x [B, T, hidden] -> [B, T, hidden]; `cache` as HydraAttention.forward takes it (decode)."""
        x = x + self.attention(self.attn_norm(x), cache=cache)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class HybridLM(nn.Module):
    """The network of a plan: one HydraAttention block per plan layer. fa_backend and gdn_backend are resolved
    backends (kernels.registry.Backend) or names, as HydraAttention takes them; mode: spec.axes.MODES. Raises
    Unsupported for GDN head dims other than the model's and for an average-layer plan (fewer layers than a
    layer-wise group)."""

    def __init__(self, plan: LayerPlan, fa_backend="auto", gdn_backend="auto", mode="sequential", eps=1e-6):
        super().__init__()
        shape, gdn = plan.shape, plan.spec.gdn
        dk, dv = gdn.dims(shape.head_dim)
        if (dk, dv) != (shape.head_dim, shape.head_dim):
            raise Unsupported("measured hybrids keep GDN heads at the model's head_dim (they reuse its projections)")
        if any(layer.weight != 1 for layer in plan.layers):
            raise Unsupported(
                f"{shape.name} has fewer layers than one layer-wise group: its plan is an average layer, "
                "not a network (use the layer or kernel scope)"
            )
        self.shape = shape
        self.blocks = nn.ModuleList(
            Block(
                shape_attention(plan, layer.fa_heads, fa_backend, gdn_backend, mode),
                shape.hidden,
                shape.mlp_hidden,
                eps,
                shape.mlp_bias,
            )
            for layer in plan.layers
        )
        self.embed = nn.Embedding(shape.vocab, shape.hidden) if shape.vocab else None
        self.norm = nn.RMSNorm(shape.hidden, eps=eps) if shape.vocab else None
        self.lm_head = nn.Linear(shape.hidden, shape.vocab, bias=False) if shape.vocab else None
        if self.lm_head is not None and shape.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def new_caches(self, batch: int, max_length: int, device, dtype) -> list[LayerCache]:
        """One empty LayerCache per layer, FA K/V buffers of max_length tokens."""
        return [block.attention.new_cache(batch, max_length, device, dtype) for block in self.blocks]

    def forward(self, inputs: torch.Tensor, caches: list[LayerCache] | None = None) -> torch.Tensor:
        """Token ids [B, T] -> logits [B, T, vocab]; for attention-only shapes, hidden [B, T, h] -> hidden."""
        x = self.embed(inputs) if self.embed is not None else inputs
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None)
        return self.lm_head(self.norm(x)) if self.lm_head is not None else x
