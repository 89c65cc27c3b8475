"""What gets timed for a point: inputs on the device and the callable that runs them, per scope and pass.

- kernel: the head-level core (FA backend on the FA heads, GDN backend on the GDN heads, their outputs apart:
  the merge back into head order belongs to the layer) of each distinct layer of the plan;
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

from hhbench.kernels import registry
from hhbench.kernels.hybrid import HybridCore
from hhbench.kernels.registry import Backend
from hhbench.layers.hydrahead import HydraAttention
from hhbench.layers.network import HybridLM, shape_attention
from hhbench.plan.grid import Point
from hhbench.spec.axes import Pass, Scope, torch_dtype
from hhbench.spec.layout import HeadSplit, build_plan

MAX_UNIT_LAYERS = 64


@dataclass
class Workload:
    """What a point times: `run` (one timed call), `outputs` (what the correctness check compares), the layers
    one run covers, whether to capture a CUDA graph, and at kernel scope each backend alone on its heads (`parts`)."""

    run: Callable[[], object]  # the timed call
    outputs: Callable[[], list[torch.Tensor]]  # what the correctness check compares
    layers_per_run: int  # latency per layer = run time / this (1 for the model scope)
    graph: bool  # capture in a CUDA graph (decode)
    parts: dict[str, Callable[[], object]] | None = None  # kernel scope: each backend alone on its heads


def unit_of(layers: list[tuple[HeadSplit, float]]) -> list[tuple[HeadSplit, int]]:
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


def timed_layers(point: Point) -> int:
    """Layers one timed run of `point` holds (its latency is per layer: run time / this): the unit of its plan's
    distinct layers (unit_of) at kernel and layer scope, 1 for the whole model."""
    if point.scope is Scope.MODEL:
        return 1
    return sum(count for _, count in unit_of(build_plan(point.shape, point.spec).distinct_layers()))


def gdn_decay(shape, device, dtype=torch.float32):
    """Log decays as GDN produces them: -exp(A) * softplus(a), most near zero (slow forgetting), some large."""
    return -torch.rand(shape, device=device, dtype=dtype).mul(4).exp().mul(0.05) * F.softplus(
        torch.randn(shape, device=device, dtype=dtype)
    )


def rounded_randn(shape, device, dtype, round_to=None, normalize: bool = False) -> torch.Tensor:
    """Standard normal values of `shape` drawn in fp32 (L2-normalized over the last dim with `normalize`), rounded
    through `round_to` (a reference run's tested dtype), then cast to `dtype`: a point and its fp32 reference draw
    the same values. Drawn in fp16 or bf16, torch's CPU normal_ gives other values than in fp32 for some sizes
    (520 elements did), and a reference then ran on other inputs."""
    t = torch.randn(shape, device=device, dtype=torch.float32)
    t = F.normalize(t, dim=-1) if normalize else t
    return t.to(round_to or dtype).to(dtype)


def core_inputs(point: Point, split: HeadSplit, device, dtype, context: int, batch: int, grad: bool, round_to=None):
    """Random inputs of a head-level core for one layer's `split`, rounded through `round_to` then cast to `dtype`:
    FA q [B, T, n_fa, d], k, v [B, T, kv heads, d] (decode: q [B, 1, n_fa, d] against caches of T); GDN q, k
    (L2-normalized), v [B, T, n_la, d], g, beta [B, T, n_la] (decode: [B, n_la, *] and a state [B, n_la, d, d]).
    Returns (fa, gdn), each None without such heads; `grad` makes them leaves for training."""
    d = point.shape.head_dim
    B, T = batch, context
    n_fa, n_la = len(split.fa_heads), len(split.la_heads)
    kv_heads = len(split.fa_groups) if split.fa_gqa_uniform else n_fa

    def rand(*shape, normalize=False):
        return rounded_randn(shape, device, dtype, round_to, normalize).requires_grad_(grad)

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


class TrainStep:
    """Forward and backward with fixed output gradients; gradients are returned, not accumulated, so repeated
    calls do the same work. Output gradients are drawn once, from their own seed, and rounded like the inputs,
    so that a reference run in fp32 back-propagates the very same values."""

    def __init__(self, forward: Callable[[], list[torch.Tensor]], leaves: list[torch.Tensor], round_to=None):
        self.forward, self.leaves, self.round_to, self.grad_outs = forward, leaves, round_to, None

    def __call__(self) -> list[torch.Tensor]:
        outs = self.forward()
        if self.grad_outs is None:
            generator = torch.Generator(device=outs[0].device).manual_seed(1234)
            self.grad_outs = [
                torch.randn(o.shape, generator=generator, device=o.device).to(self.round_to or o.dtype).to(o.dtype)
                for o in outs
            ]
        return [*outs, *torch.autograd.grad(outs, self.leaves, self.grad_outs)]

    def checked(self) -> list[torch.Tensor]:
        """The outputs, and all gradients as one vector: a tiny parameter's gradient should not decide alone."""
        results = self()
        outs, grads = results[: len(self.grad_outs)], results[len(self.grad_outs) :]
        return [*outs, torch.cat([g.float().flatten() for g in grads])]


def _checked(step) -> list[torch.Tensor]:
    return step.checked() if isinstance(step, TrainStep) else step()


def core_step(core: HybridCore, fa, gdn, pass_: Pass, round_to):
    """One hybrid core call on its inputs, returning its outputs: FA and GDN outputs as they come (the merge back
    into head order belongs to the layer, whose o_proj reads it)."""
    if pass_ is Pass.DECODE:

        def decode():
            fa_out, gdn_result = core.decode_parts(fa, gdn)
            return [t for t in (fa_out, gdn_result[0] if gdn_result else None) if t is not None]

        return decode

    def forward():
        fa_out, gdn_result = core.prefill_parts(fa, gdn)
        return [t for t in (fa_out, gdn_result[0] if gdn_result else None) if t is not None]

    return TrainStep(forward, _leaves(fa, gdn), round_to) if pass_ is Pass.TRAIN else forward


def kernel_workload(
    point: Point, device, context: int, batch: int, fa_backend: Backend, gdn_backend: Backend, dtype, round_to=None
) -> Workload:
    """The kernel-scope workload: the head-level core (HybridCore) of each distinct layer of the plan, as often
    as the timed unit holds it, on core_inputs; with the point's `parts`, each backend alone on its heads too."""
    plan = build_plan(point.shape, point.spec)
    unit = unit_of(plan.distinct_layers())
    grad = point.pass_ is Pass.TRAIN
    items = []
    for layer, count in unit:
        core = HybridCore(fa_backend, gdn_backend, point.mode, point.spec.gdn.chunk_size)
        fa, gdn = core_inputs(point, layer, device, dtype, context, batch, grad, round_to)
        items.append((core, fa, gdn, count, core_step(core, fa, gdn, point.pass_, round_to)))

    def run():
        for *_, count, step in items:
            for _ in range(count):
                step()

    def outputs():
        return [t for *_, step in items for t in _checked(step)]

    parts = None
    if point.parts and len(items) == 1:  # each backend alone on its own heads: what 'the sum of the parts' adds
        core, fa, gdn, _, _ = items[0]
        parts = {}
        if fa:
            parts["fa"] = core_step(core, fa, None, point.pass_, round_to)
        if gdn:
            parts["gdn"] = core_step(core, None, gdn, point.pass_, round_to)
    graph = point.pass_ is Pass.DECODE and device.type == "cuda"
    return Workload(run, outputs, timed_layers(point), graph, parts)


def _module_inputs(point: Point, device, dtype, context: int, batch: int):
    shape = point.shape
    if point.scope is Scope.MODEL and shape.vocab:
        length = 1 if point.pass_ is Pass.DECODE else context
        return torch.randint(0, shape.vocab, (batch, length), device=device)
    length = 1 if point.pass_ is Pass.DECODE else context
    x = torch.randn(batch, length, shape.hidden, device=device, dtype=dtype)
    return x.requires_grad_(point.pass_ is Pass.TRAIN)


def _random_caches(caches, context: int, device, round_to=None):
    """Caches as if `context` tokens were processed: random K/V (rounded_randn), states and conv states."""
    for cache in caches:
        if cache.k is not None:
            cache.k.copy_(rounded_randn(cache.k.shape, device, cache.k.dtype, round_to))
            cache.v.copy_(rounded_randn(cache.v.shape, device, cache.v.dtype, round_to))
        cache.length = context
    return caches


def _held_step(forward: Callable[[], torch.Tensor], caches, context: int):
    """One decode step at context `context` every call: after the model's step advances the caches, their length,
    state and conv state are put back (Python assignments, not kernels), so every step writes the same K/V slot and
    reads the same state: static shapes for CUDA graphs, and a cache that never outgrows its buffers. The fused
    path's conv state advances in place (values only), as a graph replay would."""
    held = [(cache.state, cache.conv) for cache in caches]

    @torch.no_grad()
    def step() -> list[torch.Tensor]:
        out = forward()
        for cache, (state, conv) in zip(caches, held, strict=True):
            cache.length, cache.state, cache.conv = context, state, conv
        return [out]

    return step


def module_workload(
    point: Point, device, context: int, batch: int, fa_backend: Backend, gdn_backend: Backend, dtype, round_to=None
) -> Workload:
    """The layer- or model-scope workload: HydraAttention per distinct layer (layer scope, as often as the unit
    holds it) or the whole HybridLM (model scope) on x [B, T, hidden] (token ids for a model with a vocabulary);
    decode runs one token against caches of `context` tokens, training forward and backward."""
    plan = build_plan(point.shape, point.spec)
    shape, gdn = point.shape, point.spec.gdn
    if point.scope is Scope.MODEL:
        modules = [(HybridLM(plan, fa_backend, gdn_backend, point.mode), 1)]
    else:
        modules = [
            (shape_attention(plan, layer.fa_heads, fa_backend, gdn_backend, point.mode), count)
            for layer, count in unit_of(plan.distinct_layers())
        ]
    for module, _ in modules:
        if round_to is not None:  # the reference sees exactly the weights the tested dtype holds
            module.to(round_to)
            for attention in _attentions(module):  # and every layer's reference glue (auto may fuse FA-only layers)
                attention.glue = "reference"
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
                    cache.conv = (rounded_randn((batch, 3 * n_la * d, gdn.conv_size), device, dtype, round_to)
                                  if gdn.conv_size else None)  # fmt: skip
            caches[i] = _random_caches(made, context, device, round_to)

    steps = []
    for i, (module, count) in enumerate(modules):
        if point.pass_ is Pass.DECODE:  # inference: no autograd (the fused glue would remake its weights per step)
            if isinstance(module, HybridLM):
                step = _held_step(lambda module=module, i=i: module(x, caches[i]), caches[i], context)
            else:
                step = _held_step(lambda module=module, i=i: module(x, cache=caches[i][0]), caches[i], context)
        elif point.pass_ is Pass.TRAIN:
            leaves = ([x] if x.is_floating_point() else []) + list(module.parameters())
            step = TrainStep(lambda module=module: [module(x)], leaves, round_to)
        else:
            step = torch.no_grad()(lambda module=module: [module(x)])
        steps.append((step, count))

    def run():
        for step, count in steps:
            for _ in range(count):
                step()

    def outputs():
        return [t for step, _ in steps for t in _checked(step)]

    return Workload(run, outputs, timed_layers(point), point.pass_ is Pass.DECODE and device.type == "cuda")


def _attentions(module) -> list[HydraAttention]:
    return [block.attention for block in module.blocks] if isinstance(module, HybridLM) else [module]


def build(point: Point, device, context: int | None = None, batch: int | None = None, fa_name=None, gdn_name=None,
          reference: bool = False, seed: int = 0) -> Workload:  # fmt: skip
    """The point's workload; with reference=True the same inputs and weights (rounded to the point's dtype) in
    fp32, for the given (reference) backends."""
    context = point.context if context is None else context
    batch = point.batch if batch is None else batch
    fa = registry.get(fa_name or point.fa_backend, registry.FA)  # resolved once: the layers run these
    gdn = registry.get(gdn_name or point.gdn_backend, registry.GDN)
    dtype = torch_dtype(point.dtype)
    round_to, dtype = (dtype, torch.float32) if reference else (None, dtype)
    torch.manual_seed(seed)
    make = kernel_workload if point.scope is Scope.KERNEL else module_workload
    return make(point, device, context, batch, fa, gdn, dtype, round_to)
