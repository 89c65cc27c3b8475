"""The floor of a layer- or model-scope point: its necessary kernels, to be timed each alone and all back to back.

Per distinct layer of the point (as often as the timed unit or the model holds it):
- `in_proj`: one GEMM of every projection that reads the layer's input (fused q/k/v of all heads, and for GDN
  heads their decay, beta and output-gate projections), its rows padded to a multiple of 64;
- `conv`: the short causal depthwise conv over the GDN heads' q, k, v channels, SiLU fused (fla's Triton
  `causal_conv1d` on CUDA where fla imports, else one `F.conv1d`); in decode its one-token update;
- `fa`: the FA backend on the FA heads (the kernel scope's part, same inputs); in decode against the cache;
- `gdn`: the GDN backend on the GDN heads; in decode one recurrent step;
- `o_proj`: the output GEMM;
- model scope also `mlp` (its two GEMMs) per layer and `lm_head` once, over the positions HybridLM computes
  (all of them: the timed model computes every position's logits).
Norms, gates, RoPE, gathers, merges and copies are what the floor leaves out: they are the implementation's
glue; so are the shape's projection and MLP biases (its GEMMs have none: a layer's F.linear adds its bias in the
same addmm). Training times each part forward and backward; decode times GEMVs (T = 1). Shapes: x [B, T, hidden];
the cores take [B, T, heads, head_dim] as at kernel scope.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hhbench.bench.workloads import TrainStep, core_inputs, core_step, unit_of
from hhbench.kernels import registry
from hhbench.kernels.hybrid import HybridCore
from hhbench.plan.grid import Point
from hhbench.spec.axes import Pass, Scope, torch_dtype
from hhbench.spec.layout import HeadSplit, build_plan


@dataclass
class FloorPart:
    """One kernel of a point's floor (module docstring): its name, the distinct layer it belongs to, how often
    the point runs it, the sizes it runs at and the callable that runs it once."""

    name: str  # in_proj | conv | fa | gdn | o_proj | mlp | lm_head
    layer: str  # which distinct layer it belongs to, e.g. "2 FA + 14 GDN heads"
    count: int  # how often the point runs it per timed unit (layer scope) or per model (model scope)
    shape: dict  # the sizes it runs at (tests compare them with the point's)
    run: Callable[[], object]


def layer_label(layer: HeadSplit) -> str:
    """A distinct layer's label in floor parts: "<n_fa> FA + <n_la> GDN heads"."""
    return f"{layer.n_fa} FA + {layer.n_la} GDN heads"


def layer_counts(point: Point) -> list[tuple[HeadSplit, int]]:
    """The distinct layers with how often the point runs each: the timed unit at layer scope, the model's own
    counts at model scope."""
    plan = build_plan(point.shape, point.spec)
    if point.scope is Scope.MODEL:
        return [(layer, round(weight)) for layer, weight in plan.distinct_layers()]
    return unit_of(plan.distinct_layers())


def _conv_kernels(device: torch.device):
    """fla's Triton causal conv (forward, update) on CUDA where fla imports, else None (torch's F.conv1d)."""
    if device.type != "cuda":
        return None
    try:
        from fla.modules.causal_conv1d import causal_conv1d, causal_conv1d_update
    except ImportError:
        return None
    return causal_conv1d, causal_conv1d_update


class _Parts:
    """Builds the parts' inputs (random, in the point's dtype) and callables."""

    def __init__(self, point: Point, device: torch.device):
        self.point, self.device, self.dtype = point, device, torch_dtype(point.dtype)
        self.tokens = 1 if point.pass_ is Pass.DECODE else point.context
        self.train = point.pass_ is Pass.TRAIN

    def tensor(self, *shape, scale=1.0):
        """A random tensor of `shape` in the point's dtype, times `scale`; a leaf taking gradients when training."""
        t = torch.randn(*shape, device=self.device, dtype=self.dtype) * scale
        return t.requires_grad_(self.train)

    def step(self, forward: Callable[[], list[torch.Tensor]], leaves: list[torch.Tensor]):
        """`forward` as the pass runs it: forward and backward (TrainStep) when training, else under no_grad."""
        return TrainStep(forward, leaves) if self.train else torch.no_grad()(forward)

    def gemm(self, n_in: int, n_out: int) -> tuple[Callable, dict]:
        """One GEMM x [B, T, n_in] @ W^T [n_in, n_out] (T = 1 in decode) -> (callable, its sizes)."""
        x = self.tensor(self.point.batch, self.tokens, n_in)
        w = self.tensor(n_out, n_in, scale=n_in**-0.5)
        return self.step(lambda: [F.linear(x, w)], [x, w]), {"tokens": self.point.batch * self.tokens,
                                                              "in": n_in, "out": n_out}  # fmt: skip

    def mlp(self, hidden: int, width: int) -> tuple[Callable, dict]:
        """The gated MLP's two GEMMs, x [B, T, hidden] -> [B, T, 2 width] -> [B, T, hidden] -> (callable, its sizes)."""
        x = self.tensor(self.point.batch, self.tokens, hidden)
        up = self.tensor(2 * width, hidden, scale=hidden**-0.5)
        down = self.tensor(hidden, width, scale=width**-0.5)
        return self.step(lambda: [F.linear(F.linear(x, up)[..., :width], down)], [x, up, down]), {
            "tokens": self.point.batch * self.tokens, "hidden": hidden, "width": width}  # fmt: skip

    def conv(self, channels: int, size: int) -> tuple[Callable, dict]:
        """The short causal depthwise conv with SiLU over `channels` channels of `size` taps (fla's causal_conv1d where
        it imports on CUDA, else F.conv1d); in decode its one-token update -> (callable, its sizes)."""
        B, T = self.point.batch, self.tokens
        weight = self.tensor(channels, size, scale=size**-0.5)
        shape = {"tokens": B * T, "channels": channels, "size": size}
        fla = _conv_kernels(self.device)
        if self.point.pass_ is Pass.DECODE:
            x = self.tensor(B, 1, channels)
            state = torch.randn(B, channels, size, device=self.device, dtype=self.dtype)
            if fla:
                return lambda: fla[1](x, state, weight=weight, activation="silu"), shape
            return lambda: F.silu(torch.einsum("bcw,cw->bc", state, weight)), shape
        x = self.tensor(B, T, channels)
        if fla:
            return self.step(lambda: [fla[0](x, weight, activation="silu")[0]], [x, weight]), shape

        def torch_conv():
            y = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), padding=size - 1, groups=channels)
            return [F.silu(y[..., :T])]

        return self.step(torch_conv, [x, weight]), shape

    def cores(self, layer: HeadSplit) -> dict[str, tuple[Callable, dict]]:
        """The FA and GDN backends alone on their heads: the kernel scope's parts, same inputs."""
        point = self.point
        fa_backend = registry.get(point.fa_backend, registry.FA) if layer.n_fa else None
        gdn_backend = registry.get(point.gdn_backend, registry.GDN) if layer.n_la else None
        core = HybridCore(fa_backend, gdn_backend, chunk_size=point.spec.gdn.chunk_size)
        fa, gdn = core_inputs(point, layer, self.device, self.dtype, point.context, point.batch, self.train)
        parts = {}
        if fa:
            parts["fa"] = (core_step(core, fa, None, point.pass_, None), {"heads": layer.n_fa,
                                                                            "kv_heads": fa[1].shape[2]})  # fmt: skip
        if gdn:
            parts["gdn"] = (core_step(core, None, gdn, point.pass_, None), {"heads": layer.n_la})
        return parts


def floor_parts(point: Point, device: torch.device) -> list[FloorPart]:
    """Every part of the point's floor, with how often the point runs it (module docstring)."""
    shape, gdn = point.shape, point.spec.gdn
    d, H, KV = shape.head_dim, shape.n_heads, shape.n_kv_heads
    dk, dv = gdn.dims(d)
    make = _Parts(point, device)
    parts = []
    for layer, count in layer_counts(point):
        label = layer_label(layer)
        n_la = layer.n_la
        gates = n_la * (2 + (dv if gdn.output_gate else 0)) if n_la else 0  # decay, beta, output gate
        rows = (H + 2 * KV) * d + gates
        # Zero rows up to a multiple of 64, as the fused layer's projection has: cuBLAS runs an odd width far
        # slower. Unpadded (Qwen3-1.7B head 7:1, 5916 rows) this GEMM took 5.8 ms at 64K on the H200, and the
        # parts summed to 13.4 ms while the whole fused layer took 12.1: a floor above the layer.
        built = {"in_proj": make.gemm(shape.hidden, rows + -rows % 64)}
        if n_la and gdn.conv_size:
            built["conv"] = make.conv(n_la * (2 * dk + dv), gdn.conv_size)
        built.update(make.cores(layer))
        built["o_proj"] = make.gemm(H * d, shape.hidden)
        if point.scope is Scope.MODEL and shape.mlp_hidden:
            built["mlp"] = make.mlp(shape.hidden, shape.mlp_hidden)
        parts += [FloorPart(name, label, count, sizes, run) for name, (run, sizes) in built.items()]
    if point.scope is Scope.MODEL and shape.vocab:
        run, sizes = make.gemm(shape.hidden, shape.vocab)
        parts.append(FloorPart("lm_head", "model", 1, sizes, run))
    return parts


def floor_layers(point: Point) -> int:
    """What the floor's sum is divided by to compare with the row's latency: the layers of the timed unit at layer
    scope (latency is per layer there), 1 at model scope (latency is the whole model's)."""
    if point.scope is Scope.MODEL:
        return 1
    return sum(count for _, count in layer_counts(point))
