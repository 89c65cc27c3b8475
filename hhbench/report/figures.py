"""The report's figures, each a pure function of the comparison frame (rows with their layer 3:1 ratios), the
quality rows or the runs' environments. A figure whose data is absent is not drawn; the reason is kept."""

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from hhbench.report.labels import (
    ROW,
    attach_hover,
    colour_key,
    context_ticks,
    ordered_variants,
    present_order,
    series_labels,
    variant_colours,
)
from hhbench.rows.schema import OK
from hhbench.spec.axes import Pass, Scope
from hhbench.spec.units import format_count

PASS_ORDER = [p.value for p in Pass]
SCOPE_ORDER = [s.value for s in Scope]
COMPONENTS = {
    "flops_fa_core": "FA core",
    "flops_gdn_core": "GDN core",
    "flops_proj": "projections",
    "flops_mlp": "MLP",
    "flops_lm_head": "LM head",
}
# Datasheet ceilings, used only when a run recorded no measured peaks and its GPU is this card.
H100_SXM = {"bf16_matmul_tflops": 989.0, "copy_gbps": 3350.0}
# One heatmap per set of layer 3:1 rows: a pure FA or GDN row joins the heatmap of the baseline it matched.
HEATMAP_GROUP = ["run", "model", "scope", "pass", "batch", "dtype", "base_fa_backend", "base_gdn_backend"]
SCOPE_SYMBOLS = {Scope.KERNEL.value: "circle", Scope.LAYER.value: "diamond", Scope.MODEL.value: "square"}
# Series of one variant (several runs or backends) share its colour; their markers tell them apart.
SHARED_SYMBOLS = ("circle", "square", "diamond", "x", "triangle-up", "cross", "star", "hexagon")
# The quality figure's variants at one context spread over this share of the narrowest gap between contexts.
DODGE_SHARE = 0.5
# plotly's legend line at its default 12 px font, and its padding; its default top and bottom margins
LEGEND_LINE_PX, LEGEND_PAD_PX, MARGIN_PX = 19, 20, {"t": 100, "b": 80}


@dataclass
class Figure:
    """A drawn figure; on creation its log axes get readable ticks, its bars' linear axes 0, and its height room for
    its whole legend."""

    slug: str  # the figure's HTML id and PNG file name
    title: str
    figure: go.Figure
    caption: str = ""

    def __post_init__(self):
        label_log_axes(self.figure)
        bars_from_zero(self.figure)
        fit_legend(self.figure)


def label_log_axes(figure: go.Figure) -> None:
    """Each log axis without tick marks of its own labels decades where its data spans two or more, else 1, 2
    and 5 times a power of ten, all written in full: plotly's default writes the 2s and 5s (or every digit)
    between decades as bare small digits, which read as '5 4 3 2 10 9 8'. Axes that match share one setting."""
    layout = figure.layout.to_plotly_json()
    groups: dict[str, list[str]] = {}
    for name, axis in layout.items():
        if name[1:5] == "axis" and axis.get("type") == "log" and axis.get("tickvals") is None:
            short = name[0] + name[5:]
            groups.setdefault(axis.get("matches") or short, []).append(short)
    if not groups:
        return
    values: dict[str, list[float]] = {}
    for trace in figure.data:
        if isinstance(trace, go.Heatmap):
            continue
        for letter in "xy":
            if getattr(trace, letter, None) is not None:
                values.setdefault(getattr(trace, f"{letter}axis", None) or letter, []).extend(_reach(trace, letter))
    for members in groups.values():
        shown = np.array([v for member in members for v in values.get(member, [])], dtype=float)
        shown = shown[np.isfinite(shown) & (shown > 0)]
        if shown.size == 0:
            continue
        lo, hi = shown.min(), shown.max()
        ticks = {"tickformat": "~s" if hi >= 1e4 else "~g"}  # 10k, 1M, 1G for counts; 0.01 to 1000 in full
        if hi / lo >= 100:
            ticks["dtick"] = 1  # one tick per decade
        elif hi / lo >= 5:
            ticks["dtick"] = "D2"  # 1, 2 and 5 times each power of ten
        # within a factor of 5 plotly's own choice is right: evenly spaced ticks, written in full
        for member in members:
            figure.layout[f"{member[0]}axis{member[1:]}"].update(ticks)


def bars_from_zero(figure: go.Figure) -> None:
    """Each linear axis that bars grow along starts at 0 (rangemode tozero): a bar reads as its value only from 0,
    and plotly's autorange, padding for markers drawn beside the bars (the kernel figure's latency and floor, near 0
    in decode), starts below it. Log axes, which have no 0, are left as they are."""
    for trace in figure.data:
        if isinstance(trace, go.Bar):
            letter = "x" if trace.orientation == "h" else "y"
            axis = figure.layout[f"{letter}axis{(trace[f'{letter}axis'] or letter)[1:]}"]
            if axis.type != "log":
                axis.rangemode = "tozero"


def _reach(trace, letter: str) -> np.ndarray:
    """The values a trace spans along one axis, its error bars' ends included."""
    data = pd.to_numeric(pd.Series(np.asarray(getattr(trace, letter)).ravel()), errors="coerce").to_numpy(float)
    error = getattr(trace, f"error_{letter}", None)
    if error is None or error.array is None:
        return data
    above = np.asarray(error.array, dtype=float)
    below = np.asarray(error.arrayminus if error.arrayminus is not None else error.array, dtype=float)
    return np.concatenate([data, data + above, data - below])


def fit_legend(figure: go.Figure) -> None:
    """Make the figure tall enough that its vertical legend shows every entry: plotly clips a legend taller than
    the plotting area behind a scroll bar, and a PNG cannot scroll."""
    entries = sum(1 for trace in figure.data if trace.showlegend is not False and trace.name)
    if entries < 2 and not any(trace.showlegend for trace in figure.data):
        return  # plotly draws no legend for a single trace
    lines = entries + (1 if figure.layout.legend.title.text else 0)
    margin = {side: figure.layout.margin[side] or default for side, default in MARGIN_PX.items()}
    needed = margin["t"] + margin["b"] + lines * LEGEND_LINE_PX + LEGEND_PAD_PX
    figure.update_layout(height=max(figure.layout.height or 0, needed))


@dataclass
class Omitted:
    """A figure not drawn, and why (its data is absent)."""

    title: str
    reason: str


def measured(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with status ok and a latency."""
    return rows[(rows["status"] == OK) & rows["latency_ms"].notna()]


def latency_figure(
    rows: pd.DataFrame, passes: list[str], slug: str, title: str, colours: dict[str, str] | None = None
) -> Figure | Omitted:
    """Median latency against context, log-log, a line per layout and ratio, p10-p90 as error bars; `colours`
    (variant label -> colour, default variant_colours of the rows) colours each series by its variant."""
    data = measured(rows)
    data = data[data["pass"].isin(passes)].sort_values("context")
    if data.empty:
        return Omitted(title, f"no measured {' or '.join(passes)} rows")
    figure = _panels(
        data.assign(
            series=series_labels(data),
            above=data["latency_p90_ms"] - data["latency_ms"],
            below=data["latency_ms"] - data["latency_p10_ms"],
        ),
        data,
        y="latency_ms",
        error_y="above",
        error_y_minus="below",
        labels={"latency_ms": "latency (ms)"},
        colours=colours,
    )
    return Figure(slug, title, figure, "Median of the repeated timings; error bars span p10 to p90.")


def floor_figure(rows: pd.DataFrame, colours: dict[str, str] | None = None) -> Figure | Omitted:
    """Latency (solid) and its floor (dotted: the point's necessary kernels timed alone) against context, a panel
    per scope and pass: the gap between the two lines is the implementation's glue. `colours` as latency_figure's."""
    title = "Latency against its floor"
    data = measured(rows)
    data = data[data["floor_ms"].notna()].sort_values("context")
    if data.empty:
        return Omitted(title, "no measured row with its floor timed (layer or model scope)")
    long = (
        data.assign(series=series_labels(data), **{ROW: data.index})
        .melt(
            id_vars=["series", "variant", "context", "scope", "pass", ROW],
            value_vars=["latency_ms", "floor_ms"],
            var_name="measure",
            value_name="ms",
        )
        .replace({"measure": {"latency_ms": "latency", "floor_ms": "floor"}})
    )
    figure = _panels(long, data, y="ms", line_dash="measure", line_dash_map={"latency": "solid", "floor": "dot"},
                     colours=colours)  # fmt: skip
    # how each drawn floor was timed (a sweep's extra.floor_method): the parts' medians summed, or every part back to
    # back (eagerly, or as one graph on CUDA-graph rows) where that is lower; each way once, in the rows' order
    ways = [way for way in dict.fromkeys(extra.get("floor_method") for extra in data["extra"]) if way]
    how = "; ".join(ways) if ways else "how, not recorded"
    caption = f"Solid: median latency. Dotted: the floor, the point's necessary kernels timed alone ({how})."
    return Figure("floor", title, figure, caption)


KERNEL_KINDS = {"floor": "#2ca02c", "shared": "#9e9e9e", "rest": "#d62728"}  # the profile's kinds of kernel


def kernel_figure(rows: pd.DataFrame) -> Figure | Omitted:
    """Each profiled layer- or model-scope row's kernel time (ms per layer, as its latency) split by kind (`sweep
    --profile`: kernels its floor parts launch, shared names, the rest), a bar per row, its latency and floor beside
    as markers, a panel per pass: how much of the gap above the floor is kernels outside the floor's parts."""
    title = "Kernel time by kind: the floor's kernels and the rest"
    data = measured(rows)
    data = data[data["extra"].map(lambda extra: isinstance(extra, dict) and "kernel_shares" in extra)]
    if data.empty:
        return Omitted(title, "no profiled layer or model row (sweep --profile)")
    data = data.sort_values(["pass", "variant", "context"])
    labels = series_labels(data) + " · " + data["scope"] + " · " + data["context"].map(format_count)
    passes = present_order(data["pass"], PASS_ORDER)
    figure = make_subplots(rows=len(passes), cols=1, subplot_titles=[f"pass={p}" for p in passes],
                           vertical_spacing=min(0.3, 0.6 / len(passes)))  # fmt: skip
    for panel, pass_ in enumerate(passes, 1):
        part = data[data["pass"] == pass_]
        y = labels[part.index]
        kernel_ms = part["extra"].map(lambda extra: extra["kernels"]["kernel_ms"])
        for kind, colour in KERNEL_KINDS.items():
            ms = kernel_ms * part["extra"].map(lambda extra, kind=kind: extra["kernel_shares"][kind])
            figure.add_bar(x=ms, y=y, orientation="h", name=f"{kind} kernels", marker_color=colour,
                           legendgroup=kind, showlegend=panel == 1, row=panel, col=1)  # fmt: skip
        for column, name, symbol in (("latency_ms", "latency (timed)", "diamond"),
                                     ("floor_ms", "floor (its parts timed alone)", "line-ns-open")):  # fmt: skip
            figure.add_scatter(x=part[column], y=y, mode="markers", name=name,
                               marker={"symbol": symbol, "size": 12, "color": "black"}, legendgroup=column,
                               showlegend=panel == 1, row=panel, col=1)  # fmt: skip
    figure.update_layout(barmode="stack", height=160 + 40 * len(data) + 60 * len(passes))
    figure.update_xaxes(title_text="ms (per layer at layer scope)")
    return Figure("kernels", title, figure, "Device time of the profiled step's kernels (CPU: operators' self time), "
                  "split by whether the point's floor parts launch them; diamond: the timed latency; vertical mark: the floor.")  # fmt: skip


def _panels(data: pd.DataFrame, rows: pd.DataFrame, **options) -> go.Figure:
    """Lines against context on log-log axes, a panel per scope and (where there are several) per pass."""
    many_passes = data["pass"].nunique() > 1
    figure = _express(
        px.line,
        data,
        rows,
        facet_col="scope",
        facet_row="pass" if many_passes else None,
        log_y=True,
        category_orders={
            "scope": present_order(data["scope"], SCOPE_ORDER),
            "pass": present_order(data["pass"], PASS_ORDER),
        },
        **options,
    )
    figure.update_yaxes(matches=None, showticklabels=True)  # scopes differ by orders of magnitude
    figure.update_layout(height=320 * data["pass"].nunique() + 120)
    return figure


def _express(
    chart, data: pd.DataFrame, rows: pd.DataFrame, colours: dict[str, str] | None = None, **options
) -> go.Figure:
    """A plotly express chart on a log x axis (context by default, its ticks the contexts), a series coloured by
    its variant (`colours`: variant label -> colour, default variant_colours of the data), each point's hover
    carrying its row of `rows`: the row its ROW column names, by default its own index label."""
    if ROW not in data:
        data = data.assign(**{ROW: data.index})
    options = {
        "x": "context",
        "color": "series",
        "log_x": True,
        "color_discrete_map": series_colours(data, colours),
        **({"markers": True} if chart is px.line else {}),
        **options,
        "custom_data": [ROW],
        "category_orders": {"series": _series_order(data), **options.get("category_orders", {})},
        "labels": {"context": "context (tokens)", "series": "variant", **options.get("labels", {})},
    }
    figure = attach_hover(chart(data, **options), rows)
    if chart is px.line:  # a scatter's symbols say something else (the roofline's: the scope)
        mark_shared_colours(figure, data)
    if options["x"] == "context":
        figure.update_xaxes(**context_ticks(data["context"]))
    return figure


def series_colours(data: pd.DataFrame, colours: dict[str, str] | None = None) -> dict[str, str]:
    """Each series' colour: its variant's in `colours` (default: variant_colours of the data's variants)."""
    colours = colours or variant_colours(data["variant"])
    firsts = data.drop_duplicates("series")
    return dict(zip(firsts["series"], firsts["variant"].map(colours), strict=True))


def mark_shared_colours(figure: go.Figure, data: pd.DataFrame) -> None:
    """Give the series of one variant (one colour_key), which share its colour, a marker symbol each (SHARED_SYMBOLS). A trace's
    series is its legend group up to plotly express's ', ' (which joins the colour's value to a dash's)."""
    firsts = data.drop_duplicates("series")
    symbol_of = {}
    for _, group in firsts.groupby(firsts["variant"].map(colour_key)):
        if len(group) > 1:
            symbol_of.update(
                {series: SHARED_SYMBOLS[i % len(SHARED_SYMBOLS)] for i, series in enumerate(group["series"])}
            )
    for trace in figure.data:
        series = (trace.legendgroup or trace.name or "").split(", ")[0]
        if series in symbol_of:
            trace.update(marker_symbol=symbol_of[series])


def _series_order(data: pd.DataFrame) -> list[str]:
    firsts = data.drop_duplicates("series")
    ranks = {v: i for i, v in enumerate(ordered_variants(firsts["variant"]))}
    return sorted(firsts["series"], key=lambda s: (ranks[firsts.set_index("series").at[s, "variant"]], s))


def speedup_figure(rows: pd.DataFrame) -> Figure | Omitted:
    """Speedup against layer 3:1 as a heatmap, ratio x context: measured latency where the group has it,
    analytic FLOPs otherwise (the subplot title says which)."""
    title = "Speedup against layer-wise 3:1"
    panels = []
    for key, part in rows.groupby(HEATMAP_GROUP, sort=False):
        if part["speedup"].notna().any():
            value, basis = part["speedup"], "measured latency"
        elif part["flops_ratio"].notna().any():
            value, basis = 1 / part["flops_ratio"], "analytic FLOPs"
        else:
            continue
        part = part.assign(value=value, label=series_labels(part), **{ROW: part.index})
        part = part[part["value"].notna()]
        run, model, scope, pass_, batch = key[:5]
        panels.append((f"{run}: {model}, {pass_}, {scope} scope, batch {batch} (by {basis})", part))
    if not panels:
        return Omitted(title, "no row has a layer 3:1 row to compare with")
    heights = [40 + 24 * part["label"].nunique() for _, part in panels]
    gap = 90  # pixels between panels: the x labels of one and the title of the next
    total = 100 + sum(heights) + gap * (len(panels) - 1)
    figure = make_subplots(
        rows=len(panels),
        cols=1,
        subplot_titles=[name for name, _ in panels],
        row_heights=heights,
        vertical_spacing=gap / total,
    )
    for index, (_, part) in enumerate(panels, 1):
        labels = sorted(part["label"].unique(), key=lambda s: _rank_of(part, s))
        contexts = sorted(part["context"].unique())
        grid = part.pivot_table(index="label", columns="context", values="value", aggfunc="first")
        grid = grid.reindex(index=labels, columns=contexts)
        cells = part.pivot_table(index="label", columns="context", values=ROW, aggfunc="first")
        cells = cells.reindex(index=labels, columns=contexts).astype(object)
        figure.add_trace(
            go.Heatmap(
                z=np.log2(grid.to_numpy(dtype=float)),
                x=[format_count(int(c)) for c in contexts],
                y=labels,
                text=[[f"{v:.2f}x" if not math.isnan(v) else "" for v in line] for line in grid.to_numpy(dtype=float)],
                texttemplate="%{text}",
                customdata=cells.to_numpy()[..., None],
                hoverongaps=False,
                coloraxis="coloraxis",
            ),
            row=index,
            col=1,
        )
    figure.update_layout(
        height=total,
        coloraxis={
            "colorscale": "RdBu",
            "cmin": -3,  # 1/8x to 8x: past that the colour saturates and the cell's text says how far
            "cmax": 3,
            "colorbar": {
                "title": "speedup",
                "tickvals": list(range(-3, 4)),
                "ticktext": ["1/8x", "1/4x", "1/2x", "1x", "2x", "4x", "8x"],
            },
        },
    )
    attach_hover(figure, rows)
    figure.update_xaxes(type="category")
    figure.update_yaxes(autorange="reversed")  # fa on top, la at the bottom, as the tables read
    return Figure("speedup", title, figure, "Cells read layer 3:1 time (or FLOPs) over the row's: above 1x is faster.")


def _rank_of(part: pd.DataFrame, label: str) -> tuple:
    variant = part.loc[part["label"] == label, "variant"].iloc[0]
    return (ordered_variants(part["variant"]).index(variant), label)


def analytic_view(rows: pd.DataFrame, model: str) -> tuple[pd.DataFrame, str]:
    """One model's analytic numbers, once each: its widest scope, first run and smallest batch (the analytic
    costs are the same in every run), and a caption saying which."""
    part = rows[rows["model"] == model]
    scope = max(part["scope"], key=SCOPE_ORDER.index)
    part = part[part["scope"] == scope]
    run = part["run"].iloc[0]
    part = part[part["run"] == run]
    batch = part["batch"].min()
    part = part[part["batch"] == batch].drop_duplicates(["variant", "pass", "context", "dtype"])
    return part.sort_values("context"), f"{model}, {scope} scope, batch {batch}, from run {run}"


def flops_figures(rows: pd.DataFrame) -> list[Figure]:
    """Per model and pass, the FLOPs of each variant by component against context: stacked on a linear axis, or
    at kernel scope side by side on a log axis (there the FA core outgrows the GDN core by orders of magnitude,
    and a stack would hide the GDN core)."""
    figures = []
    for model in rows["model"].unique():
        view, where = analytic_view(rows, model)
        log = view["scope"].iloc[0] == Scope.KERNEL.value
        for pass_ in sorted(view["pass"].unique(), key=PASS_ORDER.index):
            part = view[view["pass"] == pass_]
            contexts = part["context"].map(format_count)
            long = part.assign(context_label=contexts, **{ROW: part.index}).melt(
                id_vars=["variant", "context_label", ROW],
                value_vars=list(COMPONENTS),
                var_name="component",
                value_name="flops",
            )
            long["component"] = long["component"].map(COMPONENTS)
            if log:  # a component the kernel lacks has no bar on a log axis, nor a legend entry
                long = long[long["flops"] > 0]
            variants = ordered_variants(part["variant"])
            figure = px.bar(
                long,
                x="context_label",
                y="flops",
                color="component",
                facet_col="variant",
                facet_col_wrap=min(5, len(variants)),
                custom_data=[ROW],
                barmode="group" if log else "relative",
                log_y=log,
                category_orders={
                    "variant": variants,
                    "context_label": list(dict.fromkeys(contexts)),
                    "component": list(COMPONENTS.values()),
                },
                labels={"context_label": "context", "flops": "FLOPs"},
            )
            attach_hover(figure, part, head="<b>%{fullData.name}</b>: %{y:.4g} FLOPs<br>")
            figure.update_layout(height=300 * math.ceil(len(variants) / 5) + 120)
            figure.update_yaxes(showticklabels=True)
            title = f"FLOPs breakdown, {pass_}: {where}"
            caption = "Analytic FLOPs by component" + (", side by side on a log axis." if log else ", stacked.")
            figures.append(Figure(f"flops-{_slug(model)}-{pass_}", title, figure, caption))
    return figures


def memory_figures(rows: pd.DataFrame, colours: dict[str, str] | None = None) -> list[Figure]:
    """Per model, titled by the model alone: analytic KV cache (solid) and recurrent state (dotted) against
    context, of the scope, batch and run its panel's title names (analytic_view); then, where rows have one, the
    measured peak memory in a panel per scope and pass, each panel's title naming them (several runs or backends
    as series). `colours` as latency_figure's."""
    colours = colours or variant_colours(rows["variant"])
    figures = []
    for model in rows["model"].unique():
        view, where = analytic_view(rows, model)
        view = view[view["pass"] == view["pass"].iloc[0]]
        peaks = measured(rows[rows["model"] == model])
        peaks = peaks[peaks["peak_mem_bytes"].notna()].sort_values("context")
        peaks = peaks.assign(series=series_labels(peaks))
        panels = [(scope, pass_) for scope in SCOPE_ORDER for pass_ in PASS_ORDER
                  if ((peaks["scope"] == scope) & (peaks["pass"] == pass_)).any()]  # fmt: skip
        titles = [f"analytic KV cache (solid) and recurrent state (dotted): {where}"]
        titles += [f"measured peak memory: {scope} scope, {pass_}" for scope, pass_ in panels]
        columns = min(2, len(titles))
        lines = math.ceil(len(titles) / columns)
        figure = make_subplots(rows=lines, cols=columns, subplot_titles=titles, vertical_spacing=0.5 / lines)
        listed = set()
        for variant in ordered_variants(view["variant"]):
            part = view[view["variant"] == variant]
            for column, dash in (("kv_cache_bytes", "solid"), ("state_bytes", "dot")):
                shown = part[part[column] > 0]  # a zero has no place on a log axis: that memory is absent
                if shown.empty:
                    continue
                figure.add_trace(
                    go.Scatter(
                        x=shown["context"],
                        y=shown[column],
                        name=variant,
                        legendgroup=variant,  # one legend entry per variant, its lines shown and hidden together
                        showlegend=variant not in listed,
                        mode="lines+markers",
                        line={"dash": dash, "color": colours[variant]},
                        customdata=shown.index.to_numpy()[:, None],
                    ),
                    row=1,
                    col=1,
                )
                listed.add(variant)
        for index, (scope, pass_) in enumerate(panels, 1):
            panel = peaks[(peaks["scope"] == scope) & (peaks["pass"] == pass_)]
            for series in _series_order(panel):
                part = panel[panel["series"] == series]
                figure.add_trace(
                    go.Scatter(
                        x=part["context"],
                        y=part["peak_mem_bytes"],
                        name=series,
                        legendgroup=series,  # a series is the same variant (and run) in every panel
                        showlegend=series not in listed,
                        mode="lines+markers",
                        line={"color": colours[part["variant"].iloc[0]]},
                        customdata=part.index.to_numpy()[:, None],
                    ),
                    row=index // columns + 1,
                    col=index % columns + 1,
                )
                listed.add(series)
        if not peaks.empty:
            mark_shared_colours(figure, peaks)
        attach_hover(figure, rows)
        figure.update_xaxes(type="log", title="context (tokens)", **context_ticks(rows["context"]))
        figure.update_yaxes(type="log", title="bytes")
        figure.update_layout(height=480 * lines, legend_tracegroupgap=0)  # entries as close as plotly express sets them
        figures.append(Figure(f"memory-{_slug(model)}", f"Memory: {model}", figure))
    return figures


def roofs(env: dict) -> tuple[dict, str] | None:
    """The card's ceilings: measured ones the run recorded, else the H100 SXM datasheet for an H100, else none."""
    peaks = env.get("peaks") or {}
    if peaks.get("bf16_matmul_tflops") and peaks.get("copy_gbps"):
        return peaks, "measured peaks"
    card = str((env.get("gpu") or {}).get("name") or env.get("device") or "")
    if "h100" in card.lower():
        return H100_SXM, "datasheet H100 SXM"
    return None


def roofline_figure(
    rows: pd.DataFrame, envs: dict[str, dict], colours: dict[str, str] | None = None
) -> Figure | Omitted:
    """Achieved TFLOP/s against arithmetic intensity (analytic FLOPs over analytic fewest bytes moved), with
    each run's compute and bandwidth ceilings where known; `colours` as latency_figure's."""
    title = "Roofline"
    data = measured(rows)
    data = data[data["tflops"].notna() & (data["bytes_moved"] > 0) & (data["tflops"] > 0)]
    if data.empty:
        return Omitted(title, "no measured rows with achieved TFLOP/s")
    intensity = data["flops_total"] / data["bytes_moved"]
    figure = _express(
        px.scatter,
        data.assign(intensity=intensity, series=series_labels(data)),
        data,
        x="intensity",
        y="tflops",
        symbol="scope",
        symbol_map=SCOPE_SYMBOLS,
        log_y=True,
        category_orders={"scope": present_order(data["scope"], SCOPE_ORDER)},
        labels={"intensity": "arithmetic intensity (FLOP/byte)", "tflops": "achieved TFLOP/s"},
        colours=colours,
    )
    listed = set()
    for trace in figure.data:  # one legend entry per series, its scopes shown and hidden together
        series = trace.name.rsplit(", ", 1)[0]  # plotly express names a trace "<colour>, <symbol>"
        trace.update(name=series, legendgroup=series, showlegend=series not in listed)
        listed.add(series)
    figure.update_layout(legend_title_text="variant")
    scopes = present_order(data["scope"], SCOPE_ORDER)
    notes = ["marker: " + ", ".join(f"{SCOPE_SYMBOLS[scope]} {scope}" for scope in scopes) + " scope"]
    span = np.geomspace(intensity.min() / 4, intensity.max() * 4, 200)
    for run in data["run"].unique():
        found = roofs(envs.get(run, {}))
        if found is None:
            notes.append(f"{run}: no roof (no measured peaks recorded and not an H100)")
            continue
        peaks, source = found
        roof = np.minimum(peaks["bf16_matmul_tflops"], span * peaks["copy_gbps"] / 1000)
        name = f"{run} roof ({source}: {peaks['bf16_matmul_tflops']:.4g} TFLOP/s, {peaks['copy_gbps']:.4g} GB/s)"
        figure.add_trace(go.Scatter(x=span, y=roof, name=name, mode="lines", line={"dash": "dash", "color": "gray"}))
        notes.append(f"{run}: {source}")
    figure.update_layout(height=520)
    return Figure("roofline", title, figure, "; ".join(notes))


def quality_figure(eval_rows: pd.DataFrame, colours: dict[str, str] | None = None) -> Figure | Omitted:
    """Score against context, a panel per task and metric with its own scale, a line per variant; the variants
    at one context sit side by side (dodged along the log context axis), so equal scores (many at 0) stay
    apart instead of hiding each other. `colours` as latency_figure's."""
    title = "Quality: score against context"
    data = eval_rows[(eval_rows["status"] == OK) & eval_rows["value"].notna()] if not eval_rows.empty else eval_rows
    if data.empty:
        return Omitted(title, "no quality rows (eval.jsonl)")
    data = data.sort_values("context")
    panels = data.assign(series=series_labels(data), panel=data["task"] + " · " + data["metric"])
    order = _series_order(panels)
    contexts = np.log2(sorted(data["context"].unique()))
    spread = DODGE_SHARE * (np.diff(contexts).min() if len(contexts) > 1 else 1.0)
    offsets = np.linspace(-spread / 2, spread / 2, len(order)) if len(order) > 1 else np.zeros(1)
    shift = panels["series"].map(dict(zip(order, offsets, strict=True)))
    figure = _express(
        px.line,
        panels.assign(dodged=panels["context"] * 2.0**shift),
        data,
        x="dodged",
        y="value",
        facet_col="panel",
        facet_col_wrap=3,
        error_y="stderr",
        labels={"value": "score", "dodged": "context (tokens)"},
        colours=colours,
    )
    figure.update_xaxes(**context_ticks(data["context"]))
    figure.update_yaxes(matches=None, showticklabels=True)  # accuracies, nats and gains have their own scales
    figure.for_each_annotation(lambda note: note.update(text=note.text.removeprefix("panel=")))
    figure.update_layout(height=340 * math.ceil(panels["panel"].nunique() / 3) + 120)
    return Figure(
        "quality",
        title,
        figure,
        "Scores per task and metric as lm-eval reports them (acc and retrieval_gain, nats per answer token: higher is better; *_nll: lower is better); error bars one stderr. At each context the variants sit side by side, in legend order.",
    )


def training_figure(train_rows: pd.DataFrame, colours: dict[str, str] | None = None) -> Figure | Omitted:
    """Distillation loss against tokens trained, a line per variant (and run, where several), a panel per stage
    (train.jsonl); markers, so that a series of one logged step shows. `colours` as latency_figure's."""
    title = "Distillation: loss against tokens"
    data = train_rows[(train_rows["kind"] == "step") & (train_rows["status"] == OK) & train_rows["loss"].notna()]
    if data.empty:
        return Omitted(title, "no logged training steps")
    data = data.sort_values(["run", "variant", "stage", "step"])
    data = data.assign(
        series=series_labels(data[["variant", "run"]]),
        panel="stage "
        + data["stage"].astype(str)
        + (data["stage"] == 1).map({True: " (attention MSE)", False: " (KL)"}),
    )
    figure = px.line(data, x="tokens", y="loss", color="series", facet_col="panel", log_y=True, markers=True,
                     color_discrete_map=series_colours(data, colours), category_orders={"series": _series_order(data)},
                     labels={"series": "variant"}, hover_data=["step", "lr", "grad_norm", "tokens_per_s"])  # fmt: skip
    mark_shared_colours(figure, data)
    figure.update_yaxes(matches=None, showticklabels=True)  # stage 1's MSE and stage 2's KL have their own scales
    figure.update_xaxes(matches=None)  # and their own token budgets (stage 1 is often a few percent of stage 2)
    figure.for_each_annotation(lambda note: note.update(text=note.text.removeprefix("panel=")))
    figure.update_layout(height=460)
    return Figure("training", title, figure, "Stage 1: MSE of converted attention outputs against the teacher's; "
                  "stage 2: KL(teacher || student), answer positions weighted as the recipe says. Tokens per stage.")  # fmt: skip


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
