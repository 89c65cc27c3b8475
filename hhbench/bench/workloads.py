"""What gets timed for a point: inputs on the device and the callable that runs them, per scope and pass.

- kernel: the head-level core (FA backend on the FA heads, GDN backend on the GDN heads, heads merged back in
  order) of each distinct layer of the plan;
- layer: the HydraAttention module (projections, conv, gates, norms included);
- model: the whole HybridLM.
A plan whose layers differ (layer-wise, or uneven head counts) is timed as one unit holding each kind of layer
as many times as it occurs per repeat of the pattern (3 GDN + 1 FA layer for layer-wise 3:1), and the
latency reported per layer is the unit's time over its layer count.

Every workload has a `run` (what is timed) and an `outputs` function (what the correctness check compares:
outputs, and for training the gradients too).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from hhbench.analytic.costs import Scope
from hhbench.analytic.flops import Pass
from hhbench.kernels import registry
from hhbench.kernels.hybrid import HeadSplit, HybridCore
from hhbench.layers.hydrahead import HydraAttention
from hhbench.layers.model import HybridLM
from hhbench.plan.grid import Point
from hhbench.spec.layout import LayerAssignment, build_plan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_UNIT_LAYERS = 64


@dataclass
class Workload:
    run: Callable[[], object]  # the timed call
    outputs: Callable[[], list[torch.Tensor]]  # what the correctness check compares
    layers_per_run: int  # latency per layer = run time / this (1 for the model scope)
    graph: bool  # capture in a CUDA graph (decode)
    parts: dict[str, Callable[[], object]] | None = None  # kernel scope: each backend alone on its heads


def unit_of(layers: list[tuple[LayerAssignment, float]]) -> list[tuple[LayerAssignment, int]]:
    """Distinct layers with their smallest integer repeat counts in the plan's proportions."""
    fractions = [Fraction(weight).limit_denominator(64) for _, weight in layers]
    scale = math.lcm(*(f.denominator for f in fractions))
    counts = [int(f * scale) for f in fractions]
    divisor = math.gcd(*counts)
    counts = [c // divisor for c in counts]
    if sum(counts) > MAX_UNIT_LAYERS:  # keep the pattern's proportions to the nearest layer
        total = sum(counts)
        counts = [max(1, round(c * MAX_UNIT_LAYERS / total)) for c in counts]
    return [(layer, count) for (layer, _), count in zip(layers, counts, strict=True)]


def gdn_decay(shape, device, dtype=torch.float32):
    """Log decays as GDN produces them: -exp(A) * softplus(a), most near zero (slow forgetting), some large."""
    return -torch.rand(shape, device=device, dtype=dtype).mul(4).exp().mul(0.05) * F.softplus(
        torch.randn(shape, device=device, dtype=dtype)
    )


def _core_inputs(point: Point, split: HeadSplit, device, dtype, context: int, batch: int, grad: bool, round_to=None):
    d = point.shape.head_dim
    B, T = batch, context
    n_fa, n_la = len(split.fa_heads), len(split.la_heads)
    kv_heads = len(split.fa_groups) if split.fa_gqa_uniform else n_fa

    def rand(*shape, normalize=False):
        t = torch.randn(*shape, device=device, dtype=torch.float32)
        t = F.normalize(t, dim=-1) if normalize else t
        return t.to(round_to or dtype).to(dtype).requires_grad_(grad)

    fa = gdn = None
    if point.pass_ is Pass.DECODE:
        if n_fa:
            fa = (rand(B, 1, n_fa, d), rand(B, T, kv_heads, d), rand(B, T, kv_heads, d))
        if n_la:
            state = torch.randn(B, n_la, d, d, device=device) * 0.1
            gdn = (rand(B, n_la, d, normalize=True), rand(B, n_la, d, normalize=True), rand(B, n_la, d),
                   gdn_decay((B, n_la), device), torch.rand(B, n_la, device=device), state)  # fmt: skip
        return fa, gdn
    if n_fa:
        fa = (rand(B, T, n_fa, d), rand(B, T, kv_heads, d), rand(B, T, kv_heads, d))
    if n_la:
        g = gdn_decay((B, T, n_la), device).requires_grad_(grad)
        beta = torch.rand(B, T, n_la, device=device).requires_grad_(grad)
        gdn = (rand(B, T, n_la, d, normalize=True), rand(B, T, n_la, d, normalize=True), rand(B, T, n_la, d), g, beta)
    return fa, gdn


def _leaves(*groups) -> list[torch.Tensor]:
    return [t for group in groups if group for t in group if isinstance(t, torch.Tensor) and t.requires_grad]


def _train_step(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor]):
    """Forward and backward; gradients returned (not accumulated), so repeated calls do the same work."""
    out = forward()
    grad_out = torch.randn_like(out)
    return [out, *torch.autograd.grad(out, leaves, grad_out)]


def _backend(kind: str, name: str):
    return registry.get(name, kind)


def kernel_workload(
    point: Point, device, context: int, batch: int, fa_name: str, gdn_name: str, dtype, round_to=None
) -> Workload:
    plan = build_plan(point.shape, point.spec)
    unit = unit_of(plan.distinct_layers())
    grad = point.pass_ is Pass.TRAIN
    items = []
    for layer, count in unit:
        split = HeadSplit(layer.n_heads, layer.fa_heads, layer.group_size)
        core = HybridCore(split, _backend(registry.FA, fa_name), _backend(registry.GDN, gdn_name), point.mode,
                          point.spec.gdn.chunk_size)  # fmt: skip
        fa, gdn = _core_inputs(point, split, device, dtype, context, batch, grad, round_to)
        items.append((core, fa, gdn, count))

    def one(core, fa, gdn):
        if point.pass_ is Pass.DECODE:
            return list(core.decode(fa, gdn)[:1])
        if grad:
            return _train_step(lambda: core.prefill(fa, gdn), _leaves(fa, gdn))
        return [core.prefill(fa, gdn)]

    def run():
        for core, fa, gdn, count in items:
            for _ in range(count):
                one(core, fa, gdn)

    def outputs():
        return [t for core, fa, gdn, _ in items for t in one(core, fa, gdn)]

    parts = None
    if point.parts and len(items) == 1:
        core, fa, gdn, _ = items[0]
        parts = {}
        if fa:
            parts["fa"] = lambda: _part(core, fa, None, point.pass_)
        if gdn:
            parts["gdn"] = lambda: _part(core, None, gdn, point.pass_)
    return Workload(
        run, outputs, sum(c for *_, c in items), point.pass_ is Pass.DECODE and device.type == "cuda", parts
    )


def _part(core: HybridCore, fa, gdn, pass_: Pass):
    """One backend alone on its own heads: no merge, what 'the sum of its parts' adds up."""
    if pass_ is Pass.DECODE:
        return core.decode_parts(fa, gdn)
    if pass_ is Pass.TRAIN:
        out = [t for t in core.prefill_parts(fa, gdn) if t is not None][0]
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out, _leaves(fa, gdn), torch.randn_like(out))
    return core.prefill_parts(fa, gdn)


def _module_inputs(point: Point, device, dtype, context: int, batch: int):
    shape = point.shape
    if point.scope is Scope.MODEL and shape.vocab:
        length = 1 if point.pass_ is Pass.DECODE else context
        return torch.randint(0, shape.vocab, (batch, length), device=device)
    length = 1 if point.pass_ is Pass.DECODE else context
    x = torch.randn(batch, length, shape.hidden, device=device, dtype=dtype)
    return x.requires_grad_(point.pass_ is Pass.TRAIN)


def _random_caches(caches, context: int, device):
    """Caches as if `context` tokens were processed: random K/V, states and conv states; steps don't advance."""
    for cache in caches:
        if cache.k is not None:
            cache.k.normal_()
            cache.v.normal_()
        cache.length = context
        cache.advance = False
    return caches


def module_workload(
    point: Point, device, context: int, batch: int, fa_name: str, gdn_name: str, dtype, round_to=None
) -> Workload:
    plan = build_plan(point.shape, point.spec)
    shape, gdn = point.shape, point.spec.gdn
    if point.scope is Scope.MODEL:
        modules = [(HybridLM(plan, fa_name, gdn_name, point.mode), 1)]
        per_run = 1
    else:
        modules = [
            (HydraAttention(shape.hidden, shape.n_heads, shape.n_kv_heads, shape.head_dim, layer.fa_heads,
                            gdn.conv_size, gdn.output_gate, gdn.chunk_size, fa_name, gdn_name, point.mode), count)
            for layer, count in unit_of(plan.distinct_layers())
        ]  # fmt: skip
        per_run = sum(count for _, count in modules)
    for module, _ in modules:
        if round_to is not None:  # the reference sees exactly the weights the tested dtype holds
            module.to(round_to)
        module.to(device=device, dtype=dtype)
    x = _module_inputs(point, device, round_to or dtype, context, batch)
    if x.is_floating_point():
        x = x.detach().to(dtype).requires_grad_(point.pass_ is Pass.TRAIN)
    caches = {}
    if point.pass_ is Pass.DECODE:
        for i, (module, _) in enumerate(modules):
            if isinstance(module, HybridLM):
                made = module.new_caches(batch, context + 1, device, dtype)
            else:
                made = [module.new_cache(batch, context + 1, device, dtype)]
            for cache, attention in zip(made, _attentions(module), strict=True):
                if attention.gdn is not None:
                    n_la, d = attention.gdn.n_heads, shape.head_dim
                    cache.state = torch.randn(batch, n_la, d, d, device=device) * 0.1
                    cache.conv = [torch.randn(batch, c, gdn.conv_size - 1, device=device, dtype=dtype)
                                  for c in (n_la * d, n_la * d, n_la * d)] if gdn.conv_size else None  # fmt: skip
            caches[i] = _random_caches(made, context, device)

    def one(i, module):
        if point.pass_ is Pass.DECODE:
            if isinstance(module, HybridLM):
                return [module(x, caches[i])]
            return [module(x, cache=caches[i][0])]
        if point.pass_ is Pass.TRAIN:
            leaves = ([x] if x.is_floating_point() else []) + [p for p in module.parameters()]
            return _train_step(lambda: module(x), leaves)
        with torch.no_grad():
            return [module(x)]

    def run():
        for i, (module, count) in enumerate(modules):
            for _ in range(count):
                one(i, module)

    def outputs():
        return [t for i, (module, _) in enumerate(modules) for t in one(i, module)]

    return Workload(run, outputs, per_run, point.pass_ is Pass.DECODE and device.type == "cuda")


def _attentions(module) -> list[HydraAttention]:
    return [block.attention for block in module.blocks] if isinstance(module, HybridLM) else [module]


def build(point: Point, device, context: int | None = None, batch: int | None = None, fa_name=None, gdn_name=None,
          reference: bool = False, seed: int = 0) -> Workload:  # fmt: skip
    """The point's workload; with reference=True the same inputs and weights (rounded to the point's dtype) in
    fp32, for the given (reference) backends."""
    context = point.context if context is None else context
    batch = point.batch if batch is None else batch
    fa_name, gdn_name = fa_name or point.fa_backend, gdn_name or point.gdn_backend
    dtype = DTYPES[point.dtype]
    round_to, dtype = (dtype, torch.float32) if reference else (None, dtype)
    torch.manual_seed(seed)
    make = kernel_workload if point.scope is Scope.KERNEL else module_workload
    return make(point, device, context, batch, fa_name, gdn_name, dtype, round_to)
