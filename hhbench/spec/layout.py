"""The layout builder: which heads of which layers keep full attention.

Rounding rules (documented in docs/methods.md):
- head layout: the model keeps round(L * H * fa / (la + fa)) FA heads in all (halves round up), at least one
  per layer; per-layer counts differ by at most one, the extra heads spread evenly over the depth. Inside a
  layer the FA heads are spread evenly over the head indices, or, with kv_aware, packed into as few KV groups
  as possible. With per-head scores, the best head of every layer is taken first, then the rest of the
  budget by score over the whole model.
- layer layout: in every group of la + fa consecutive layers the last fa are FA (Qwen3-Next places its
  full-attention layer last in each group). A shape with fewer layers than one group (a single attention
  layer, like h32d128) stands for the average layer of a group: its plan is one FA layer and one GDN layer
  weighted la / (la + fa) and fa / (la + fa).
Every plan reports the ratio it really has (`ratio_effective`).
"""

from dataclasses import dataclass
from functools import cached_property

from hhbench.errors import UserError
from hhbench.spec.hybrid import HeadMap, HybridSpec, Layout, format_effective_ratio
from hhbench.spec.shapes import ModelShape


@dataclass(frozen=True)
class HeadSplit:
    """One layer's heads split by kind: which of its `n_heads` query heads are FA (`fa_heads`, head indices in
    0..n_heads-1, in the order their kernel inputs take), the rest GDN, and which KV group each head reads
    (`group_size` query heads per KV head, GQA). In a plan it also carries how many of the model's layers it stands
    for (`weight`) and its sliding window in keys (`window`, 0: full attention; its FA heads attend within it).
    The cost model, the kernels' inputs and HydraAttention's gathers all read it."""

    n_heads: int
    fa_heads: tuple[int, ...]
    group_size: int = 1  # query heads per KV head
    weight: float = 1.0  # how many of the model's layers this entry stands for
    window: int = 0

    @property
    def n_fa(self) -> int:
        """How many heads are FA."""
        return len(self.fa_heads)

    @property
    def n_la(self) -> int:
        """How many heads are GDN."""
        return self.n_heads - self.n_fa

    @property
    def la_heads(self) -> tuple[int, ...]:
        """The GDN heads, ascending."""
        fa = set(self.fa_heads)
        return tuple(h for h in range(self.n_heads) if h not in fa)

    @property
    def fa_groups(self) -> tuple[int, ...]:
        """The KV groups the FA heads read, ascending: what the KV cache holds."""
        return tuple(sorted({h // self.group_size for h in self.fa_heads}))

    @property
    def kv_groups(self) -> int:
        """Distinct KV heads the FA heads read: this, not the FA head count, sets the KV cache."""
        return len(self.fa_groups)

    @property
    def fa_gqa_uniform(self) -> bool:
        """True when each read group serves the same number of consecutive FA heads, in order: the FA kernel can
        then take the compact K/V with native GQA; otherwise K/V are expanded per FA head."""
        groups = self.fa_groups
        if not groups or len(self.fa_heads) % len(groups):
            return False
        per = len(self.fa_heads) // len(groups)
        return all(h // self.group_size == groups[i // per] for i, h in enumerate(self.fa_heads))

    def fa_kv_index(self) -> tuple[int, ...]:
        """For each FA head, the position of its group among fa_groups (K/V expansion when not uniform)."""
        position = {g: i for i, g in enumerate(self.fa_groups)}
        return tuple(position[h // self.group_size] for h in self.fa_heads)

    def original_positions(self) -> tuple[int, ...]:
        """For each head in the original order, its position among the FA heads followed by the GDN heads."""
        order = (*self.fa_heads, *self.la_heads)
        return tuple(order.index(h) for h in range(self.n_heads))

    def la_kv_groups(self) -> tuple[int, ...]:
        """For each GDN head, its KV group: GDN heads reuse their group's keys and values."""
        return tuple(h // self.group_size for h in self.la_heads)

    @property
    def kind(self) -> tuple:
        """What makes two layers of a plan time alike: their FA heads and window."""
        return self.fa_heads, self.window


@dataclass(frozen=True)
class LayerPlan:
    """A spec laid out on a shape: one HeadSplit per model layer (or weighted average layers, module docstring)."""

    shape: ModelShape
    spec: HybridSpec
    layers: tuple[HeadSplit, ...]

    @cached_property
    def fa_heads(self) -> float:
        """FA heads over the model (layer weights applied)."""
        return sum(layer.n_fa * layer.weight for layer in self.layers)

    @cached_property
    def la_heads(self) -> float:
        """GDN heads over the model (layer weights applied)."""
        return sum(layer.n_la * layer.weight for layer in self.layers)

    @cached_property
    def kv_groups(self) -> float:
        """KV heads the FA heads read, over the model (layer weights applied): what sets the KV cache."""
        return sum(layer.kv_groups * layer.weight for layer in self.layers)

    @property
    def ratio_effective(self) -> str:
        """The LA:FA ratio of heads the plan really has, e.g. '7:1' or '118:17' (format_effective_ratio)."""
        return format_effective_ratio(_clean(self.la_heads), _clean(self.fa_heads))

    def distinct_layers(self) -> list[tuple[HeadSplit, float]]:
        """Each different layer once, with the number of model layers it stands for (what a timer runs)."""
        weights: dict[tuple, float] = {}
        first: dict[tuple, HeadSplit] = {}
        for layer in self.layers:
            weights[layer.kind] = weights.get(layer.kind, 0.0) + layer.weight
            first.setdefault(layer.kind, layer)
        return [(first[kind], weights[kind]) for kind in first]


def _clean(value: float) -> float:
    return round(value) if abs(value - round(value)) < 1e-9 else value


def spread(count: int, slots: int) -> list[int]:
    """`count` items over `slots` as evenly as possible: per-slot counts, extras spread (Bresenham)."""
    return [(i + 1) * count // slots - i * count // slots for i in range(slots)]


def even_indices(n: int, size: int) -> list[int]:
    """n indices spread evenly over range(size), centered in their strides."""
    return sorted({(2 * j + 1) * size // (2 * n) for j in range(n)})


def _pick_in_layer(n: int, shape: ModelShape, kv_aware: bool, scores: tuple[float, ...] | None) -> tuple[int, ...]:
    heads = range(shape.n_heads)
    if n == 0:
        return ()
    if n >= shape.n_heads:
        return tuple(heads)
    if not kv_aware:
        if scores is None:
            return tuple(even_indices(n, shape.n_heads))
        return tuple(sorted(sorted(heads, key=lambda h: (-scores[h], h))[:n]))
    groups = [list(range(g * shape.group_size, (g + 1) * shape.group_size)) for g in range(shape.n_kv_heads)]
    needed = -(-n // shape.group_size)
    if scores is None:
        chosen = [groups[g] for g in even_indices(needed, shape.n_kv_heads)]
    else:
        for group in groups:
            group.sort(key=lambda h: (-scores[h], h))
        # Best groups first by the summed score of the heads each would contribute.
        take = min(n, shape.group_size)
        chosen = sorted(groups, key=lambda g: -sum(scores[h] for h in g[:take]))[:needed]
    picked = [h for group in chosen for h in group][:n]
    return tuple(sorted(picked))


def _head_counts_by_score(scores: tuple[tuple[float, ...], ...], total: int, n_layers: int) -> list[int]:
    counts = [1] * n_layers
    best = {(layer, max(range(len(row)), key=lambda h: (row[h], -h))) for layer, row in enumerate(scores)}
    rest = sorted(
        ((row[h], layer, h) for layer, row in enumerate(scores) for h in range(len(row)) if (layer, h) not in best),
        key=lambda item: (-item[0], item[1], item[2]),
    )
    for _, layer, _ in rest[: max(0, total - n_layers)]:
        counts[layer] += 1
    return counts


def _check_head_map(head_map: HeadMap, shape: ModelShape) -> None:
    rows = head_map.fa_heads or head_map.scores or ()
    if len(rows) != shape.n_layers:
        raise UserError(f"head map {head_map.source} has {len(rows)} layers, model {shape.name} has {shape.n_layers}")
    if head_map.scores and any(len(row) != shape.n_heads for row in head_map.scores):
        raise UserError(f"head map {head_map.source}: every layer needs {shape.n_heads} scores")
    for layer, heads in enumerate(head_map.fa_heads):
        if len(set(heads)) != len(heads) or any(not 0 <= h < shape.n_heads for h in heads):
            raise UserError(
                f"head map {head_map.source}: layer {layer} FA heads {list(heads)} must be distinct, in 0..{shape.n_heads - 1}"
            )


def build_plan(shape: ModelShape, spec: HybridSpec) -> LayerPlan:
    """The LayerPlan of `spec` (normalized) on `shape`, by the rounding rules of the module docstring. Raises
    UserError for a head map that does not fit the shape, or a layer-wise group averaged over differing windows."""
    spec = spec.normalized()
    L, H = shape.n_layers, shape.n_heads

    def layer(fa_heads, weight=1.0, index=0):
        return HeadSplit(H, tuple(fa_heads), shape.group_size, weight, shape.window(index))

    if spec.layout is Layout.FA:
        layers = [layer(range(H), index=i) for i in range(L)]
    elif spec.layout is Layout.LA:
        layers = [layer((), index=i) for i in range(L)]
    elif spec.layout is Layout.LAYER:
        period = spec.ratio.la + spec.ratio.fa
        if L < period:
            if len(set(shape.layer_windows)) > 1:
                raise UserError(f"{shape.name}: an average layer of a layer-wise group needs one window for all layers")
            layers = [
                layer((), weight=L * spec.ratio.la / period),
                layer(range(H), weight=L * spec.ratio.fa / period),
            ]
        else:
            layers = [layer(range(H) if i % period >= spec.ratio.la else (), index=i) for i in range(L)]
    else:
        head_map = spec.head_map
        if head_map is not None:
            _check_head_map(head_map, shape)
        if head_map is not None and head_map.fa_heads:
            layers = [layer(heads, index=i) for i, heads in enumerate(head_map.fa_heads)]
        else:
            total = int(L * H * spec.ratio.fa / (spec.ratio.la + spec.ratio.fa) + 0.5)
            total = min(max(total, L), L * H)  # HydraHead keeps at least one FA head in every layer
            scores = head_map.scores if head_map is not None else None
            counts = spread(total, L) if scores is None else _head_counts_by_score(scores, total, L)
            layers = [
                layer(_pick_in_layer(n, shape, spec.kv_aware, scores[i] if scores else None), index=i)
                for i, n in enumerate(counts)
            ]
    return LayerPlan(shape, spec, tuple(layers))


def distinct_plans(shape: ModelShape, specs: list[tuple[str, HybridSpec]]) -> list[tuple[str, LayerPlan]]:
    """Each spec's plan once, with the ratio text first asked for it: 0:1 head and 0:1 layer are one plan."""
    plans: dict[HybridSpec, tuple[str, LayerPlan]] = {}
    for requested, spec in specs:
        plan = build_plan(shape, spec)
        plans.setdefault(plan.spec, (requested, plan))
    return list(plans.values())
