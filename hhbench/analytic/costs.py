"""The analytic cost of one configuration: FLOPs by component and memory, summed over a layer plan.

Scopes and passes: hhbench.spec.axes.
"""

from dataclasses import asdict, dataclass

from hhbench.analytic import flops as F
from hhbench.analytic import memory as M
from hhbench.errors import UserError
from hhbench.spec.axes import Pass, Scope, dtype_bytes
from hhbench.spec.layout import LayerPlan

# Which cost fields are conventions or estimates rather than exact counts, per pass.
ESTIMATED = {
    Pass.PREFILL: "flops_elementwise",
    Pass.DECODE: "flops_elementwise",
    Pass.TRAIN: "flops_elementwise,flops_fa_core(backward 2.5x convention)",
}


@dataclass(frozen=True)
class Costs:
    """Analytic costs of one configuration at one scope: FLOPs by component (2 per multiply-add; the
    conventions are in hhbench.analytic.flops), and bytes of KV cache, GDN state, weights and the least traffic."""

    flops_total: float
    flops_attention: float  # FA core + GDN core
    flops_fa_core: float
    flops_gdn_core: float
    flops_proj: float  # qkvo + gdn_proj + conv
    flops_qkvo: float
    flops_gdn_proj: float
    flops_conv: float
    flops_mlp: float
    flops_lm_head: float
    flops_elementwise: float  # estimate, not part of flops_total
    flops_estimated: str
    kv_cache_bytes: float
    state_bytes: float
    weight_bytes: float
    bytes_moved: float  # fewest bytes the scope must move (inputs read once, outputs written once): rooflines

    def as_dict(self) -> dict:
        """The fields as a dict, as Row takes them."""
        return asdict(self)


def analytic_costs(
    plan: LayerPlan, pass_: Pass, context: int, batch: int = 1, scope: Scope = Scope.MODEL, dtype: str = "bf16"
) -> Costs:
    """FLOPs and bytes of `plan` for one `pass_` over `batch` sequences of `context` tokens, at `scope`
    (model: whole network; layer / kernel: averaged per attention layer; kernel: the cores alone). `dtype` sizes
    the KV cache, weights and traffic. Raises UserError for a non-positive context or batch, or an unknown dtype."""
    if context <= 0 or batch <= 0:
        raise UserError(f"context and batch must be positive, got context={context} batch={batch}")
    shape, gdn = plan.shape, plan.spec.gdn
    d, (dk, dv), C, B, T = shape.head_dim, gdn.dims(shape.head_dim), gdn.chunk_size, batch, context
    nbytes = dtype_bytes(dtype)
    sums = dict.fromkeys(("fa", "gdn", "qkvo", "gproj", "conv", "elem", "kv", "state", "weights", "core_io"), 0.0)
    for layer, weight in plan.distinct_layers():
        fa, la = layer.n_fa, layer.n_la
        q, k, v, o = M.projection_widths(shape, layer, gdn)
        part = {
            "fa": F.fa_core(pass_, B, fa, T, d, layer.window),
            "gdn": F.gdn_core(pass_, B, la, T, dk, dv, C),
            "qkvo": F.linear(pass_, B, T, shape.hidden, q + k + v) + F.linear(pass_, B, T, o, shape.hidden),
            "gproj": F.linear(pass_, B, T, shape.hidden, M.gdn_projection_width(la, dv, gdn)),
            "conv": F.depthwise_conv(pass_, B, T, M.gdn_conv_channels(la, dk, dv, gdn), gdn.conv_size),
            "elem": F.elementwise_fa(pass_, B, fa, T, layer.window) + F.elementwise_gdn(pass_, B, la, T, dk, dv, C),
            # A sliding-window layer keeps only its window's keys and values (a rolling cache).
            "kv": M.kv_cache_bytes(layer.kv_groups, F.attended(T, layer.window), d, nbytes, B),
            "state": M.gdn_state_bytes(la, dk, dv, gdn, nbytes, B),
            "weights": M.layer_weight_params(shape, layer, gdn) * nbytes,
            "core_io": M.core_bytes_moved(pass_ is Pass.DECODE, B, T, layer, d, dk, dv, nbytes, gdn),
        }
        if la and fa:  # HydraHead's per-head output norms
            part["elem"] += F.elementwise_norm(pass_, B, T, fa * d + la * dv)
        for key, value in part.items():
            sums[key] += weight * value

    per_layer = scope is not Scope.MODEL
    scale = 1.0 / shape.n_layers if per_layer else 1.0
    fa_core, gdn_core = sums["fa"] * scale, sums["gdn"] * scale
    if scope is Scope.KERNEL:
        qkvo = gproj = conv = 0.0
        elementwise = sums["elem"] * scale
        weights = 0.0
    else:
        qkvo, gproj, conv = sums["qkvo"] * scale, sums["gproj"] * scale, sums["conv"] * scale
        elementwise = sums["elem"] * scale
        weights = sums["weights"] * scale
    mlp = lm_head = 0.0
    if scope is Scope.MODEL:
        mlp = shape.n_layers * F.linear(pass_, B, T, shape.hidden, 3 * shape.mlp_hidden)
        # Generation needs the next-token logits only: prefill and decode compute one position, training all.
        lm_head = F.linear(pass_, B, T if pass_ is Pass.TRAIN else 1, shape.hidden, shape.vocab)
        # the blocks' pre-norms and, with a vocabulary, the final norm (embedding_params counts its weight)
        norms = (M.block_norms(shape) * shape.n_layers + bool(shape.vocab)) * shape.hidden
        elementwise += F.elementwise_norm(pass_, B, T, norms)
        elementwise += shape.n_layers * F.elementwise_swiglu(pass_, B, T, shape.mlp_hidden)
        weights += (shape.n_layers * M.block_weight_params(shape) + M.embedding_params(shape)) * nbytes
    # Training reads every input again and writes its gradient, and reads the output's gradient: 3x forward.
    passes = 3 if pass_ is Pass.TRAIN else 1
    moved = sums["core_io"] * scale * passes
    if scope is not Scope.KERNEL:  # weights once, and the layer's input and output activations
        moved += weights * passes + 2 * B * F.tokens(pass_, T) * shape.hidden * nbytes * passes * (
            shape.n_layers if scope is Scope.MODEL else 1
        )
    proj = qkvo + gproj + conv
    return Costs(
        flops_total=fa_core + gdn_core + proj + mlp + lm_head,
        flops_attention=fa_core + gdn_core,
        flops_fa_core=fa_core,
        flops_gdn_core=gdn_core,
        flops_proj=proj,
        flops_qkvo=qkvo,
        flops_gdn_proj=gproj,
        flops_conv=conv,
        flops_mlp=mlp,
        flops_lm_head=lm_head,
        flops_elementwise=elementwise,
        flops_estimated=ESTIMATED[pass_],
        kv_cache_bytes=sums["kv"] * scale,
        state_bytes=sums["state"] * scale,
        weight_bytes=weights,
        bytes_moved=moved,
    )
