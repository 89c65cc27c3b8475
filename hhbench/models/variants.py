"""Model variants as `hhbench eval` names them, and the layer plan each one converts the teacher to.

    teacher                    the unconverted model
    head:R                     head-level HydraHead at LA:FA ratio R, FA heads from the layout builder (even spread)
    head:R:uniform             the same, spelled out
    head:R:random[:SEED]       the builder's per-layer FA head counts, the heads drawn at random (seed 0 by default)
    head:R:map=PATH            FA heads (or per-head scores) from a head-map JSON
    head:R:selected            the head map given with --head-map (what `hhbench select-heads` writes)
    layer:R                    layer-wise: in every group of la+fa layers the last fa keep full attention
    la                         every head Gated DeltaNet
    VARIANT@RUN                that variant's student distilled by `hhbench distill` into the run folder RUN

A ratio is a proportion (head:6:2 is head:3:1, and is labelled so), and a variant asked for twice counts once.

Head choices are a registry (`head_choice`): a new way to pick FA heads registers a function that turns the
variant and the shape into a HeadMap (or None for the layout builder's own choice).
"""

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hhbench.errors import UserError
from hhbench.names import Registry
from hhbench.spec.hybrid import HeadMap, HybridSpec, Layout, Ratio
from hhbench.spec.layout import LayerPlan, build_plan
from hhbench.spec.shapes import ModelShape

TEACHER = "teacher"
BASELINE = "layer:3:1"  # what every comparison is made against


@dataclass(frozen=True)
class Variant:
    """A model variant as `hhbench eval` names it (module docstring): label, layout and ratio (None for the
    teacher), head choice and its argument, and the distillation run holding its student."""

    label: str  # canonical name, the `variant` of eval rows
    layout: Layout | None = None  # None: the teacher
    ratio: Ratio | None = None
    heads: str = "uniform"  # the head choice (head layout only)
    argument: str = ""  # the choice's argument: a seed, a path
    checkpoint: str = ""  # a distillation run folder holding this variant's student ("" : the conversion itself)

    @property
    def base_label(self) -> str:
        """The label without the distillation run: what the run's checkpoint is named by."""
        return self.label.split("@")[0]

    @property
    def is_teacher(self) -> bool:
        """True for the unconverted model."""
        return self.layout is None

    def head_map(self, shape: ModelShape, head_map_path: str | None = None) -> HeadMap | None:
        """The HeadMap of a head-level variant by its head choice (HEAD_CHOICES); None for other layouts or the
        layout builder's own spread. Raises UserError as the choice does (a missing or bad head-map file)."""
        if self.layout is not Layout.HEAD:
            return None
        return HEAD_CHOICES[self.heads](self, shape, head_map_path)

    def plan(self, shape: ModelShape, head_map_path: str | None = None) -> LayerPlan | None:
        """The layer plan of the converted model; None for the teacher."""
        if self.is_teacher:
            return None
        spec = HybridSpec(self.layout, self.ratio or Ratio(1, 0), head_map=self.head_map(shape, head_map_path))
        return build_plan(shape, spec)


HeadChoice = Callable[[Variant, ModelShape, str | None], HeadMap | None]
HEAD_CHOICES: Registry = Registry("head choice")


def head_choice(name: str):
    """Decorator: register a way of choosing the FA heads of `head:R:<name>` variants; a name registered twice is
    a ValueError."""

    def wrap(fn: HeadChoice) -> HeadChoice:
        HEAD_CHOICES[name] = fn
        return fn

    return wrap


@head_choice("uniform")
def _uniform(variant: Variant, shape: ModelShape, head_map_path: str | None) -> HeadMap | None:
    return None  # the layout builder's even spread


@head_choice("random")
def _random(variant: Variant, shape: ModelShape, head_map_path: str | None) -> HeadMap:
    """The builder's per-layer counts, the heads drawn at random: only where the FA heads sit changes."""
    counts = [layer.n_fa for layer in build_plan(shape, HybridSpec(Layout.HEAD, variant.ratio)).layers]
    rng = random.Random(int(variant.argument or 0))
    fa = tuple(tuple(sorted(rng.sample(range(shape.n_heads), n))) for n in counts)
    return HeadMap(fa_heads=fa, source=f"random:{variant.argument or 0}")


@head_choice("map")
def _from_file(variant: Variant, shape: ModelShape, head_map_path: str | None) -> HeadMap:
    return HeadMap.load(variant.argument)


@head_choice("selected")
def _selected(variant: Variant, shape: ModelShape, head_map_path: str | None) -> HeadMap:
    if not head_map_path:
        raise UserError(
            f"variant {variant.label} needs --head-map PATH (a head-map JSON, e.g. from hhbench select-heads)"
        )
    return HeadMap.load(head_map_path)


def parse_variant(text: str) -> Variant:
    """A Variant from its name (module docstring), ratio reduced (head:6:2 is head:3:1). Raises UserError (one
    line, with the accepted forms) for a bad name."""
    text = text.strip()
    if "@" in text:
        base, run = text.split("@", 1)
        variant = parse_variant(base)
        if variant.is_teacher or not run:
            raise UserError(f"bad variant {text!r}: VARIANT@RUN names a distilled student, e.g. layer:3:1@results/RUN")
        return dataclasses.replace(variant, label=f"{variant.label}@{Path(run).name}", checkpoint=run)
    if text == TEACHER:
        return Variant(TEACHER)
    if text == "la":
        return Variant("la", Layout.LA, Ratio(1, 0))
    parts = text.split(":")
    kinds = {"head": Layout.HEAD, "layer": Layout.LAYER}
    if len(parts) < 3 or parts[0] not in kinds:
        raise UserError(
            f"bad variant {text!r}: expected teacher, la, layer:LA:FA or head:LA:FA[:uniform|:random[:SEED]|"
            ":map=PATH|:selected]"
        )
    layout, ratio = kinds[parts[0]], Ratio.parse(f"{parts[1]}:{parts[2]}").reduced()  # a proportion: 6:2 is 3:1
    base = f"{layout.value}:{ratio}"
    rest = parts[3:]
    if layout is Layout.LAYER or not rest:
        if rest:
            raise UserError(f"bad variant {text!r}: layer variants take no head choice")
        return Variant(base, layout, ratio)
    choice, argument = rest[0], ":".join(rest[1:])
    if choice.startswith("map="):
        choice, argument = "map", ":".join([choice.removeprefix("map="), *rest[1:]])
        if not argument:
            raise UserError(f"bad variant {text!r}: map= needs a path")
        if not Path(argument).exists():
            raise UserError(f"variant {text}: no head map at {argument}")
    if choice not in HEAD_CHOICES:
        raise UserError(f"bad variant {text!r}: head choice {choice!r} is not one of {', '.join(HEAD_CHOICES)}")
    if choice == "random":
        if argument and not argument.isdigit():
            raise UserError(f"bad variant {text!r}: the random seed must be a whole number")
        argument = argument or "0"
    elif choice != "map" and argument:
        raise UserError(f"bad variant {text!r}: {choice} takes no argument")
    if choice == "uniform":
        return Variant(base, layout, ratio)
    label = f"{base}:map={argument}" if choice == "map" else f"{base}:{choice}" + (f":{argument}" if argument else "")
    return Variant(label, layout, ratio, choice, argument)


def parse_variants(texts: list[str]) -> list[Variant]:
    """Each variant once, by its canonical label (head:6:2 and head:3:1:uniform are head:3:1), in first-seen
    order; two students of one label from different run folders are refused, since their rows would share it."""
    unique: dict[str, Variant] = {}
    for variant in map(parse_variant, texts):
        kept = unique.setdefault(variant.label, variant)
        if Path(kept.checkpoint).resolve() != Path(variant.checkpoint).resolve():
            raise UserError(f"variant {variant.label} names two students: {kept.checkpoint} and {variant.checkpoint}")
    if not unique:
        raise UserError("no variant given")
    return list(unique.values())
