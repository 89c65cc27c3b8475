"""Analytic memory: KV cache, GDN recurrent state and weights. Pure functions of shapes."""

from hhbench.analytic.flops import attended
from hhbench.spec.hybrid import GDNConfig
from hhbench.spec.layout import HeadSplit
from hhbench.spec.shapes import ModelShape


def kv_cache_bytes(kv_groups: float, context: int, head_dim: int, dtype_bytes: int, batch: int = 1) -> float:
    """K and V of every KV head the FA heads read, for `context` tokens."""
    return batch * kv_groups * context * head_dim * 2 * dtype_bytes


def gdn_state_bytes(la_heads: float, dk: int, dv: int, gdn: GDNConfig, dtype_bytes: int, batch: int = 1) -> float:
    """The dk x dv recurrent state of every GDN head, plus the short conv's last (kernel - 1) inputs of q, k, v."""
    state = dk * dv * gdn.state_dtype_bytes
    conv = (2 * dk + dv) * max(gdn.conv_size - 1, 0) * dtype_bytes
    return batch * la_heads * (state + conv)


def projection_widths(shape: ModelShape, layer: HeadSplit, gdn: GDNConfig) -> tuple[int, int, int, int]:
    """Output widths of the Q, K, V projections and input width of O for one layer.

    When GDN heads keep the model's head_dim (the default), a converted layer reuses the original projections:
    they are those of the vanilla layer whatever the split. With other GDN widths the GDN heads get projections
    of their own and the FA heads keep theirs, for the KV groups they read."""
    d = shape.head_dim
    dk, dv = gdn.dims(d)
    if layer.n_la == 0 or (dk == d and dv == d):
        return shape.n_heads * d, shape.n_kv_heads * d, shape.n_kv_heads * d, shape.n_heads * d
    fa, la, groups = layer.n_fa, layer.n_la, layer.kv_groups
    return fa * d + la * dk, groups * d + la * dk, groups * d + la * dv, fa * d + la * dv


def gdn_projection_width(la_heads: int, dv: int, gdn: GDNConfig) -> int:
    """Decay gate and beta (one scalar each per head) and the output gate (dv per head), all from the hidden."""
    return la_heads * (2 + (dv if gdn.output_gate else 0))


def gdn_conv_channels(la_heads: int, dk: int, dv: int, gdn: GDNConfig) -> int:
    """Channels of the GDN short conv over q, k and v (2*dk + dv per head); 0 without a conv."""
    return la_heads * (2 * dk + dv) if gdn.conv_size else 0


def layer_weight_params(shape: ModelShape, layer: HeadSplit, gdn: GDNConfig) -> int:
    """Attention-layer parameters: projections with the biases and q/k norms the shape has, GDN extras (gates,
    conv, A_log and dt_bias), per-head norms."""
    dk, dv = gdn.dims(shape.head_dim)
    q, k, v, o = projection_widths(shape, layer, gdn)
    params = shape.hidden * (q + k + v) + o * shape.hidden
    params += (q + k + v) * shape.qkv_bias + shape.hidden * shape.o_bias + 2 * shape.head_dim * shape.qk_norm
    if layer.n_la:
        params += shape.hidden * gdn_projection_width(layer.n_la, dv, gdn)
        params += gdn_conv_channels(layer.n_la, dk, dv, gdn) * gdn.conv_size
        params += 2 * layer.n_la
        # HydraHead normalizes every head's output and scales it by a learned gamma.
        params += layer.n_fa * (shape.head_dim + 1) + layer.n_la * (dv + 1)
    return params


def block_norms(shape: ModelShape) -> int:
    """Pre-norms a block holds: the attention's, and the MLP's where the shape has an MLP (layers.network.Block)."""
    return 2 if shape.mlp_hidden else 1


def block_weight_params(shape: ModelShape) -> int:
    """The parts of a block every layout shares: gated MLP (with its biases, if any) and the pre-norms (block_norms;
    an attention-only shape's block still normalizes the attention's input)."""
    biases = (2 * shape.mlp_hidden + shape.hidden) * shape.mlp_bias if shape.mlp_hidden else 0
    return 3 * shape.hidden * shape.mlp_hidden + biases + block_norms(shape) * shape.hidden


def embedding_params(shape: ModelShape) -> int:
    """Parameters of the input embedding, the LM head (unless tied) and the final norm; 0 for a shape without
    a vocabulary."""
    if not shape.vocab:
        return 0
    return shape.vocab * shape.hidden * (1 if shape.tie_embeddings else 2) + shape.hidden


def core_bytes_moved(
    decode: bool,
    batch: int,
    context: int,
    layer: HeadSplit,
    head_dim: int,
    dk: int,
    dv: int,
    dtype_bytes: int,
    gdn: GDNConfig,
) -> float:
    """Fewest bytes the attention cores of one layer move in a forward pass: each input read once, each output
    written once. Prefill: FA reads q and the K, V of its KV groups and writes o; GDN reads per-head q, k, v,
    the decay and beta and writes o. Decode: FA reads the whole KV cache (its window's in a sliding-window
    layer); GDN reads and writes its state."""
    fa, la, groups = layer.n_fa, layer.n_la, layer.kv_groups
    if decode:
        cached = attended(context, layer.window)
        fa_bytes = (2 * fa * head_dim) * dtype_bytes + kv_cache_bytes(groups, cached, head_dim, dtype_bytes)
        gdn_bytes = la * ((2 * dk + 2 * dv + 2) * dtype_bytes + 2 * dk * dv * gdn.state_dtype_bytes)
        return batch * (fa_bytes + gdn_bytes)
    fa_bytes = (2 * fa * head_dim + 2 * groups * head_dim) * dtype_bytes
    gdn_bytes = la * (2 * dk + 2 * dv + 2) * dtype_bytes
    return batch * context * (fa_bytes + gdn_bytes)
