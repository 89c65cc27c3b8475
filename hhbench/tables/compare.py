"""Every configuration against the layer-wise 3:1 row of its own run, model, context, batch, pass, scope, dtype
and backends: latency, speedup, the floor (its necessary kernels alone) and latency over it, FLOPs and KV-cache
ratios, achieved TFLOP/s, peak memory; per head-level ratio
the context from which it beats layer 3:1; and, for several runs, the same configurations side by side."""

import json
from dataclasses import dataclass

import pandas as pd

from hhbench.errors import UserError
from hhbench.files import open_output
from hhbench.rows.schema import ANALYTIC, INCORRECT, OK, markdown_table
from hhbench.rows.sources import Run
from hhbench.spec.axes import Pass, Scope
from hhbench.spec.hybrid import LAYER31
from hhbench.spec.units import format_bytes, format_count
from hhbench.tables.host import host_bound, host_times

BASELINE = LAYER31.label
# A row and its layer 3:1 baseline share these; backends are matched apart (a pure layout leaves one empty).
GROUP = ["run", "model", "context", "batch", "pass", "scope", "dtype"]
BACKENDS = ["fa_backend", "gdn_backend"]
# A configuration apart from its context: the series that a crossover runs along.
SERIES = ["run", "model", "scope", "pass", "batch", "dtype", *BACKENDS, "mode", "head_map", "kv_aware", "variant"]
# rows.schema.KEY_FIELDS in reading order (the variant names the normalized ratio).
KEY = [*SERIES[1:], "context"]
COMPARED = (OK, ANALYTIC)
DISAGREE_SLOWER = "fewer FLOPs, slower"
DISAGREE_FASTER = "more FLOPs, faster"
HOST_BOUND = "host-bound"  # a measured row issued in >= tables.host.HOST_BOUND_SHARE of its latency: the host's time


@dataclass
class Comparison:
    """Every row against its layer-wise 3:1 baseline (module docstring), the crossover of each head-level series,
    and, for several runs, the configurations they share side by side."""

    rows: pd.DataFrame  # one line per row, with its baseline's numbers and the ratios
    crossovers: pd.DataFrame  # one line per head-level series
    side_by_side: pd.DataFrame  # configurations found in several runs, one column set per run (empty for one run)
    runs: list[str]
    measured: bool  # some row has a measured latency; analytic-only comparisons leave latency out

    def to_csv(self, path) -> None:
        """Write the compared rows as CSV (without samples_ms and extra); raises UserError for an unwritable path."""
        with open_output(path, "w") as out:  # lists and dicts stay in the JSON
            self.rows.drop(columns=["samples_ms", "extra"]).to_csv(out, index=False)

    def to_json(self, path) -> None:
        """Write runs, baseline, rows, crossovers and side-by-side as JSON; raises UserError for an unwritable path."""
        data = {
            "runs": self.runs,
            "measured": self.measured,
            "baseline": BASELINE,
            "rows": _records(self.rows),
            "crossovers": _records(self.crossovers),
            "side_by_side": _records(self.side_by_side),
        }
        with open_output(path, "w") as out:
            json.dump(data, out, indent=1)
            out.write("\n")

    def to_markdown(self) -> str:
        """Markdown: a table per (run, model, scope, pass), the crossover table, and the runs side by side."""
        parts = []
        for heading, section in self.rows.groupby(["run", "model", "scope", "pass"], sort=False):
            run, model, scope, pass_ = heading
            title = f"### {model}, {pass_}, {scope} scope" + (f" — run {run}" if len(self.runs) > 1 else "")
            parts += [title, "", markdown_table(_display(section, self.measured)), ""]
        parts += [f"### From which context head-level beats {BASELINE}", ""]
        crossovers = crossover_table(self.crossovers, len(self.runs) > 1)
        parts.append(markdown_table(crossovers) if not crossovers.empty else "No head-level rows to compare.")
        if len(self.runs) > 1:
            parts += ["", "### Runs side by side", ""]
            if self.side_by_side.empty:
                basis = "was measured" if self.measured else "appears"
                parts.append(f"No configuration {basis} in more than one run.")
            else:
                parts.append(markdown_table(_display_side_by_side(self.side_by_side)))
        return "\n".join(parts).rstrip() + "\n"


def _records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records")) if not frame.empty else []


def compare_runs(runs: list[Run]) -> Comparison:
    """The Comparison of the runs' performance rows, in reading order. Raises UserError when no run has any (quality
    rows only)."""
    frames = [run.frame() for run in runs if run.rows]
    if not frames:
        raise UserError("no performance rows to compare (only quality rows given)")
    labels = [run.label for run in runs if run.rows]
    frame = pd.concat(frames, ignore_index=True)
    frame = frame.sort_values(
        ["run", "model", "scope", "pass", "batch", "dtype", "context"],
        key=lambda column: _reading_order(column, labels),
        kind="stable",
    ).reset_index(drop=True)
    measured = bool(frame["latency_ms"].notna().any())
    rows = against_layer31(frame)
    side_by_side = runs_side_by_side(rows, labels, measured) if len(labels) > 1 else pd.DataFrame()
    return Comparison(rows, crossovers(rows, measured), side_by_side, labels, measured)


def _reading_order(column: pd.Series, labels: list[str]) -> pd.Series:
    """Runs in the order given, passes and scopes in their natural order, the rest as they sort."""
    orders = {"run": labels, "pass": [p.value for p in Pass], "scope": [s.value for s in Scope]}
    if column.name in orders:
        return column.map({value: index for index, value in enumerate(orders[column.name])})
    return column


def against_layer31(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with base_* columns (its layer 3:1 row's; NaN where none matched), speedup, flops_ratio,
    kv_ratio and a note (where analytic and measured disagree, and HOST_BOUND where the row was)."""
    records = frame[[*GROUP, *BACKENDS, "variant", "status"]].to_dict("records")
    baselines: dict[tuple, list[int]] = {}
    for index, record in enumerate(records):
        if record["variant"] == BASELINE:
            baselines.setdefault(tuple(record[name] for name in GROUP), []).append(index)
    chosen = [
        _baseline_of(record, records, baselines.get(tuple(record[name] for name in GROUP), [])) for record in records
    ]
    matched = [position for position, index in enumerate(chosen) if index is not None]
    base = frame.iloc[[chosen[position] for position in matched]].set_axis(matched).reindex(frame.index)
    out = frame.copy()
    for name in ("latency_ms", "status", *BACKENDS):
        out[f"base_{name}"] = base[name]
    never = out["status"] == INCORRECT
    both_measured = (out["status"] == OK) & (base["status"] == OK)
    out["speedup"] = (base["latency_ms"] / out["latency_ms"]).where(both_measured)
    out["flops_ratio"] = _ratio(out["flops_total"], base["flops_total"]).where(~never)
    out["kv_ratio"] = _ratio(out["kv_cache_bytes"], base["kv_cache_bytes"]).where(~never)
    host = host_times(out)
    bound = [host_bound(h, t) and s == OK for h, t, s in zip(host, out["latency_ms"], out["status"], strict=True)]
    notes = zip(out["status"], out["reason"], out["speedup"], out["flops_ratio"], strict=True)
    out["note"] = [
        "; ".join(filter(None, (_note(*n), HOST_BOUND if b else ""))) for n, b in zip(notes, bound, strict=True)
    ]
    return out


def _ratio(value: pd.Series, base: pd.Series) -> pd.Series:
    return (value / base.where(base > 0)).astype(float)


def _baseline_of(row: dict, records: list[dict], candidates: list[int]) -> int | None:
    """The position of the row's layer 3:1 row, or None. Backends must match, except one the row leaves empty (a
    pure FA row runs no GDN kernel); that wildcard holds only if it leaves a single backend pair."""
    pair = tuple(row[name] for name in BACKENDS)
    fits = [i for i in candidates if all(row[n] in ("", records[i][n]) for n in BACKENDS)]
    exact = [i for i in fits if tuple(records[i][n] for n in BACKENDS) == pair]
    if exact:
        fits = exact
    elif len({tuple(records[i][n] for n in BACKENDS) for i in fits}) != 1:
        return None
    compared = [i for i in fits if records[i]["status"] in COMPARED]
    return (compared or fits)[0]


def _note(status: str, reason: str, speedup: float, flops_ratio: float) -> str:
    if status not in COMPARED:
        return f"{status}: {reason}" if reason else status
    if pd.isna(speedup) or pd.isna(flops_ratio):
        return ""
    if flops_ratio < 1 and speedup < 1:
        return DISAGREE_SLOWER
    if flops_ratio > 1 and speedup > 1:
        return DISAGREE_FASTER
    return ""


def crossovers(rows: pd.DataFrame, measured: bool) -> pd.DataFrame:
    """Per head-level series, the shortest context from which it beats layer 3:1 at every longer context, by
    measured latency (speedup > 1) and by analytic FLOPs (flops_ratio < 1); None where it never does."""
    head = rows[rows["layout"] == "head"]
    lines = []
    for key, series in head.groupby(SERIES, sort=False):
        series = series.sort_values("context")
        line = dict(zip(SERIES, key, strict=True))
        by_flops = series.dropna(subset=["flops_ratio"])
        line["from_context_flops"] = from_context(by_flops["context"], by_flops["flops_ratio"] < 1)
        line["contexts_flops"] = len(by_flops)
        line["max_context_flops"] = by_flops["context"].max() if len(by_flops) else None
        if measured:
            by_latency = series.dropna(subset=["speedup"])
            line["from_context_latency"] = from_context(by_latency["context"], by_latency["speedup"] > 1)
            line["contexts_latency"] = len(by_latency)
            line["max_context_latency"] = by_latency["context"].max() if len(by_latency) else None
        lines.append(line)
    return pd.DataFrame(lines)


def from_context(contexts: pd.Series, wins: pd.Series):
    """The smallest context from which every longer one wins, or None."""
    start = None
    for context, win in zip(contexts, wins, strict=True):
        if not win:
            start = None
        elif start is None:
            start = int(context)
    return start


def crossover_table(frame: pd.DataFrame, several_runs: bool) -> pd.DataFrame:
    """For reading: one line per head-level ratio, the context from which it beats layer 3:1 by measured
    latency and by analytic FLOPs ('never' when it does not at the longest context compared)."""
    if frame.empty:
        return frame
    view = pd.DataFrame(index=frame.index)
    for name in SERIES:
        if name in ("run", "model", "pass", "scope", "variant") or distinct_values(frame[name]) > 1:
            view[name] = frame[name]
    for basis, label in (("latency", "from (latency)"), ("flops", "from (FLOPs)")):
        if f"from_context_{basis}" in frame:
            pairs = zip(frame[f"from_context_{basis}"], frame[f"contexts_{basis}"], strict=True)
            view[label] = [_from_text(start, count) for start, count in pairs]
    longest = frame.filter(like="max_context_").max(axis=1)
    view["longest context"] = longest.map(lambda v: format_count(int(v)) if pd.notna(v) else "")
    if not several_runs:
        view = view.drop(columns="run")
    return view


def distinct_values(column: pd.Series) -> int:
    """How many values a column holds, an empty one not counted (a layout that runs no such kernel)."""
    return column[column != ""].nunique()


def _from_text(start, compared: int) -> str:
    if not compared:
        return ""
    return "never" if start is None or pd.isna(start) else format_count(int(start))


def runs_side_by_side(rows: pd.DataFrame, labels: list[str], measured: bool) -> pd.DataFrame:
    """Configurations found in several runs, one column set per run; the first run is the reference of the
    ratio columns. The dtype and the backends are left out of the match unless dropping one would make two rows
    of one run collide: with one value inside each run (the device's dtype or backends, empty where a layout runs
    no such kernel) they are the run's identity; where one varies inside a run (a backend chosen per point), each
    run's value is shown in a column of its own (`gdn_backend@RUN`), so rows that differ only there stand side by
    side, and say so."""
    key, shown = list(KEY), []
    for name in ("dtype", *BACKENDS):
        fewer = [field for field in key if field != name]
        if not rows.duplicated(["run", *fewer]).any():
            key = fewer
            if (rows[rows[name] != ""].groupby("run")[name].nunique() > 1).any():
                shown.append(name)
    # Analytic rows have no latency: beside measured runs they add nothing here (their ratios are above).
    value_columns = ["latency_ms", "speedup"] if measured else ["flops_ratio", "kv_ratio"]
    wide = rows.pivot_table(index=key, columns="run", values=[*shown, *value_columns], aggfunc="first", dropna=False)
    wide = wide[wide[value_columns[0]].notna().sum(axis=1) > 1]
    out = pd.DataFrame(index=wide.index)
    first = labels[0]
    for label in labels:
        for column in [*shown, *value_columns]:
            if (column, label) in wide:
                out[f"{column}@{label}"] = wide[(column, label)]
        if label != first and (value_columns[0], label) in wide and (value_columns[0], first) in wide:
            out[f"{value_columns[0]} {label}/{first}"] = (
                wide[(value_columns[0], label)] / wide[(value_columns[0], first)]
            )
    out = out.reset_index().sort_values(key, key=lambda column: _reading_order(column, labels), kind="stable")
    return out.drop(columns=[name for name in key if out[name].nunique() <= 1 and len(out) > 1])


def _display(section: pd.DataFrame, measured: bool) -> pd.DataFrame:
    """What a reader needs of one section: columns that say something, numbers in their units."""
    view = pd.DataFrame(index=section.index)
    for name in ("batch", "dtype", *BACKENDS, "mode", "head_map"):
        if section[name].nunique() > 1 or (name in BACKENDS and (section[name] != "").any()):
            view[name] = section[name]
    view["context"] = section["context"].map(format_count)
    view["variant"] = section["variant"]
    view["ratio_effective"] = section["ratio_effective"]
    view["status"] = section["status"]
    if measured:
        view["latency_ms"] = section["latency_ms"]
        view["p10-p90_ms"] = [
            f"{lo:.4g}-{hi:.4g}" if pd.notna(lo) and pd.notna(hi) else ""
            for lo, hi in zip(section["latency_p10_ms"], section["latency_p90_ms"], strict=True)
        ]
        host = host_times(section)
        if host.notna().any():  # eager CUDA points: near latency_ms, the GPU waits for the host's launches
            view["host_ms"] = host
        view["speedup"] = section["speedup"].map(_fixed)
        if section["floor_ms"].notna().any():  # layer and model points timed with their floor
            view["floor_ms"] = section["floor_ms"]
            view["vs_floor"] = section["vs_floor"].map(_fixed)
    view["flops_ratio"] = section["flops_ratio"].map(_fixed)
    view["kv_ratio"] = section["kv_ratio"].map(_fixed)
    if measured:
        view["TFLOP/s"] = section["tflops"]
        view["peak_mem"] = section["peak_mem_bytes"].map(lambda v: format_bytes(v) if pd.notna(v) else "")
    view["note"] = section["note"]
    return view


def _display_side_by_side(frame: pd.DataFrame) -> pd.DataFrame:
    view = frame.copy()
    if "context" in view:
        view["context"] = view["context"].map(format_count)
    for column in view.columns:
        if column.startswith("latency_ms@"):
            view[column] = view[column].map(lambda v: f"{v:.4g}" if pd.notna(v) else "")
        elif column not in KEY and column.split("@")[0] not in KEY:  # the ratios, not a run's backend
            view[column] = view[column].map(_fixed)
    return view


def _fixed(value) -> str:
    return f"{value:.3f}" if pd.notna(value) else ""
