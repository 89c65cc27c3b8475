"""What the report's figures call things: series labels, the order variants read in, and hover text carrying
every field of a row."""

import math

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from hhbench.spec.units import format_count
from hhbench.tables.compare import distinct_values

# Fields that tell series apart when they vary among the rows of one figure (the variant always does).
DISTINGUISHING = ["run", "model", "batch", "dtype", "fa_backend", "gdn_backend", "mode", "head_map", "kv_aware"]
LAYOUT_RANK = {"fa": 0, "layer": 1, "head": 2, "la": 3}


def series_labels(frame: pd.DataFrame, also: tuple[str, ...] = ()) -> pd.Series:
    """'head:7:1', or 'head:7:1 · run gpu-a · fla' where runs or backends differ within the figure."""
    fields = dict.fromkeys([*DISTINGUISHING, *also])  # a field named twice is told once
    varying = [name for name in fields if name in frame and _varies(frame, name)]

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


# runs x variants outnumber plotly's 10 default colours; a report's variants rarely outnumber these 24
PALETTE = px.colors.qualitative.Dark24


def colour_key(variant: str) -> str:
    """What a variant's colour follows: its label less the checkpoint an evaluated variant names after '@'
    ('head:3:1@runs/distill-x' is the head:3:1 that distill trained, which train.jsonl calls 'head:3:1')."""
    return variant.split("@", 1)[0]


def variant_colours(variants) -> dict[str, str]:
    """One colour per distinct colour_key of the variants, in reading order (ordered_variants), keyed by each
    variant: a report draws every figure with one such map, so that a variant keeps its colour from figure to
    figure."""
    keys = ordered_variants(colour_key(variant) for variant in variants)
    colour = {key: PALETTE[index % len(PALETTE)] for index, key in enumerate(keys)}
    return {variant: colour[colour_key(variant)] for variant in set(variants)}


HOVER_LINE_CHARS, SEPARATOR = 100, " · "  # a hover line's fields: about this many characters, apart by this
ROW = "_row"  # the column a figure passes as custom_data: the label of each point's row in the hover frame


def attach_hover(figure: go.Figure, frame: pd.DataFrame, head: str = "") -> go.Figure:
    """Each point's hover shows every field of its row that holds a value, after `head` (a plotly hovertemplate
    fragment), several fields to a line: plotly draws no hover label at all that is taller than its figure, and
    a row's ~60 fields one per line are. Traces name their points' rows by the labels of `frame`'s index in
    customdata (shape (points, 1), or (y, x, 1) for a heatmap, NaN for an empty cell); those labels are replaced
    by the fields that differ within the trace, while the fields a trace's points share are written once into
    its hovertemplate: the page then carries a trace's model, backends or device once, not once per point."""
    columns = [name for name in frame.columns if not name.startswith("_")]
    texts = frame[columns].map(_text)
    for trace in figure.data:
        if trace.customdata is None:
            continue
        labels = np.asarray(trace.customdata, dtype=object)[..., 0]
        present = [label for label in labels.ravel() if not pd.isna(label)]
        block = texts.loc[present].to_numpy(dtype=object)
        template, varying, gappy = _hover_template(columns, block)
        points = block[:, [columns.index(name) for name in varying]]
        for column, name in enumerate(varying):
            if name in gappy:  # a field some points lack: the field with its separator, or nothing
                points[:, column] = [f"{SEPARATOR}<b>{name}</b>: {text}" if text else "" for text in points[:, column]]
        by_label = dict(zip(present, points.tolist(), strict=True))
        blank = [""] * len(varying)
        trace.customdata = np.array(
            [by_label[label] if not pd.isna(label) else blank for label in labels.ravel()], dtype=object
        ).reshape(*labels.shape, len(varying))
        trace.hovertemplate = head + template + "<extra></extra>"
    return figure


def _hover_template(columns: list[str], block: np.ndarray) -> tuple[str, list[str], set[str]]:
    """The hovertemplate of one trace whose rows' field texts are `block` (rows x columns), fields filling lines
    of about HOVER_LINE_CHARS; the fields left to its points' customdata (in order) and those of them that some
    points lack (they carry their own separator and never start a line)."""
    pieces, varying, gappy, line = [], [], set(), 0
    for name, values in zip(columns, block.T, strict=True):
        distinct = set(values)
        if distinct == {""}:
            continue
        width = len(name) + 2 + max(map(len, distinct))
        if len(distinct) == 1:
            field = f"<b>{name}</b>: {values[0]}"
        else:
            slot = f"%{{customdata[{len(varying)}]}}"
            varying.append(name)
            if "" in distinct:
                gappy.add(name)
                pieces.append(slot)
                line += width + len(SEPARATOR)
                continue
            field = f"<b>{name}</b>: {slot}"
        if pieces:
            wrap = line + len(SEPARATOR) + width > HOVER_LINE_CHARS
            pieces.append("<br>" if wrap else SEPARATOR)
            line = 0 if wrap else line + len(SEPARATOR)
        pieces.append(field)
        line += width
    return "".join(pieces), varying, gappy


def _text(value) -> str:
    if value is None or isinstance(value, str) and not value:
        return ""
    if isinstance(value, list | tuple):  # a run's samples: ten to a line, so the label stays on the screen
        items = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in value]
        return ",<br>".join(", ".join(items[start : start + 10]) for start in range(0, len(items), 10))
    if isinstance(value, dict):
        items = [f"{k}={v}" for k, v in value.items()]
        return (", " if sum(map(len, items)) < HOVER_LINE_CHARS else ",<br>").join(items)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def context_ticks(contexts) -> dict:
    """Tick marks at the measured contexts, written as 4k, 32k, 1m."""
    values = sorted({int(c) for c in contexts})
    return {"tickvals": values, "ticktext": [format_count(v) for v in values]}
