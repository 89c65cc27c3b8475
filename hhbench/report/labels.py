"""What the report's figures call things: series labels, the order variants read in, and hover text carrying
every field of a row."""

import math

import pandas as pd

from hhbench.spec.units import format_count
from hhbench.tables.compare import distinct_values

# Fields that tell series apart when they vary among the rows of one figure (the variant always does).
DISTINGUISHING = ["run", "model", "batch", "dtype", "fa_backend", "gdn_backend", "mode", "head_map", "kv_aware"]
LAYOUT_RANK = {"fa": 0, "layer": 1, "head": 2, "la": 3}


def series_labels(frame: pd.DataFrame, also: tuple[str, ...] = ()) -> pd.Series:
    """'head:7:1', or 'head:7:1 · run gpu-a · fla' where runs or backends differ within the figure."""
    varying = [name for name in [*DISTINGUISHING, *also] if name in frame and _varies(frame, name)]

    def label(row) -> str:
        parts = [row["variant"]]
        for name in varying:
            value = row[name]
            if name == "kv_aware":
                parts.append("kv-aware" if value else "")
            elif name in ("run", "batch"):
                parts.append(f"{name} {value}")
            else:
                parts.append(str(value))
        return " · ".join(part for part in parts if part)

    return frame.apply(label, axis=1) if not frame.empty else pd.Series(dtype=str)


def _varies(frame: pd.DataFrame, name: str) -> bool:
    """Whether a field tells rows apart; with several runs, a field constant within each run (its device's
    dtype or backends) is already told by the run's label."""
    if name == "run" or "run" not in frame or frame["run"].nunique() == 1:
        return distinct_values(frame[name]) > 1
    return bool((frame.groupby("run")[name].agg(distinct_values) > 1).any())


def present_order(column: pd.Series, order: list[str]) -> list[str]:
    """The values of `order` that the column holds: a facet per value present, none empty."""
    return [value for value in order if value in set(column)]


def variant_rank(variant: str) -> tuple:
    """fa first, then layer-wise and head-level by falling FA share, la last; '+kv' and '+map' after the plain."""
    layout, _, rest = variant.partition(":")
    ratio, _, suffix = rest.partition("+")
    la, _, fa = ratio.partition(":")
    share = int(fa) / (int(la) + int(fa)) if la.isdigit() and fa.isdigit() and int(la) + int(fa) else 0.0
    return (LAYOUT_RANK.get(layout, len(LAYOUT_RANK)), -share, suffix, variant)


def ordered_variants(variants) -> list[str]:
    """The distinct variants in reading order (variant_rank)."""
    return sorted(set(variants), key=variant_rank)


def hover_text(frame: pd.DataFrame) -> pd.Series:
    """Every field of each row that holds a value, one per line."""
    columns = [name for name in frame.columns if not name.startswith("_")]
    return pd.Series(
        [
            "<br>".join(f"<b>{name}</b>: {text}" for name in columns if (text := _text(record[name])))
            for record in frame.to_dict("records")
        ],
        index=frame.index,
    )


def _text(value) -> str:
    if value is None or isinstance(value, str) and not value:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def context_ticks(contexts) -> dict:
    """Tick marks at the measured contexts, written as 4k, 32k, 1m."""
    values = sorted({int(c) for c in contexts})
    return {"tickvals": values, "ticktext": [format_count(v) for v in values]}
