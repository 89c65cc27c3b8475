"""Parsing of the values several commands and suite files share (models, layouts, ratios, contexts, passes).

One rule for every list, in every command (`eval`'s variants, tasks and lengths too): a value asked for twice counts once, in first-seen order
(`256,256` and `1k,1024` are one context), and so does a hybrid that normalizes to the same spec (`6:2` is
`3:1`; `head:0:1` is `fa`); it keeps the ratio text first asked for it."""

from hhbench.errors import UserError
from hhbench.spec.axes import Pass
from hhbench.spec.hybrid import GDNConfig, HeadMap, HybridSpec, Layout, Ratio
from hhbench.spec.shapes import ModelShape, resolve_shape
from hhbench.spec.units import parse_count, split_list


def models(text: list[str] | str, overrides: list[str] | None = None) -> list[ModelShape]:
    """Model shapes from a list of preset names or config.json paths (comma-separated or repeated), each with the
    `field=value` overrides, repeats dropped. Raises UserError for none or an unknown one."""
    names = split_list(text)
    if not names:
        raise UserError("no model given")
    return unique([resolve_shape(name, overrides or []) for name in names])


def unique(values: list) -> list:
    """Each value once, in first-seen order."""
    return list(dict.fromkeys(values))


def contexts(text: list[str] | str) -> list[int]:
    """Context lengths in tokens from '4k,8192'-style text (parse_count), repeats dropped. Raises UserError for none
    or a bad one."""
    values = unique([parse_count(item, "context") for item in split_list(text)])
    if not values:
        raise UserError("no context given")
    return values


def passes(text: list[str] | str) -> list[Pass]:
    """Passes from 'prefill,decode'-style text, repeats dropped. Raises UserError for none or an unknown one."""
    values = unique([Pass.parse(item) for item in split_list(text)])
    if not values:
        raise UserError("no pass given")
    return values


def positive(value: int, name: str) -> int:
    """`value` if > 0, else UserError naming the option --`name`."""
    if value <= 0:
        raise UserError(f"--{name} must be a positive integer, got {value}")
    return value


def hybrid_specs(
    layouts: list[str] | str,
    ratios: list[str] | str,
    gdn: GDNConfig | None = None,
    head_map: str | None = None,
    kv_aware: bool = False,
) -> list[tuple[str, HybridSpec]]:
    """Every layout crossed with every ratio, paired with the ratio text as asked; `fa`/`la` take no ratio. A spec
    that normalizes to one listed before (6:2 after 3:1, head:0:1 after fa) is dropped."""
    layout_values = [Layout.parse(item) for item in split_list(layouts)]
    ratio_texts = split_list(ratios)
    ratio_values = [Ratio.parse(item) for item in ratio_texts]
    if not layout_values:
        raise UserError("no layout given")
    if not ratio_values and any(layout in (Layout.HEAD, Layout.LAYER) for layout in layout_values):
        raise UserError("layouts head and layer need --ratios")
    loaded_map = HeadMap.load(head_map) if head_map else None
    gdn = gdn or GDNConfig()
    specs: list[tuple[str, HybridSpec]] = []
    for layout in layout_values:
        if layout is Layout.FA:
            specs.append(("0:1", HybridSpec(Layout.FA, Ratio(0, 1), gdn)))
        elif layout is Layout.LA:
            specs.append(("1:0", HybridSpec(Layout.LA, Ratio(1, 0), gdn)))
        else:
            mapped = loaded_map if layout is Layout.HEAD else None
            aware = kv_aware and layout is Layout.HEAD
            specs += [
                (text, HybridSpec(layout, ratio, gdn, mapped, aware))
                for text, ratio in zip(ratio_texts, ratio_values, strict=True)
            ]
    first: dict[HybridSpec, tuple[str, HybridSpec]] = {}
    for text, spec in specs:
        first.setdefault(spec.normalized(), (text, spec))
    return list(first.values())
