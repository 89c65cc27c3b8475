"""The quality comparison: accuracy per task and context length for each variant, and its delta against the
layer-wise 3:1 baseline. Pure functions over eval rows, shared by `hhbench eval` and the report."""

import math

from hhbench.eval.generators import PRIMARY_METRIC, primary_metric
from hhbench.models.variants import BASELINE
from hhbench.rows.schema import OK, EvalRow, markdown_table
from hhbench.spec.units import format_count

PASS_RATES = (PRIMARY_METRIC,)  # metrics that are a share of prompts answered (acc): k of n, Wilson's interval
CONFIDENCE = 0.95
NORMAL_Z = 1.96  # the normal interval's half-width in standard errors at CONFIDENCE, for the other scores


def interval(metric: str, value: float | None, stderr: float | None, samples: int) -> tuple[float, float] | None:
    """The CONFIDENCE interval (low, high) of a score over `samples` prompts. A pass rate (PASS_RATES, where value x
    samples is a whole number k of prompts answered) gets Wilson's score interval (scipy.stats.binomtest's
    proportion_ci; Wilson 1927): it stays inside [0, 1] and keeps a width at 0/n and n/n, where the normal interval
    collapses to a point (0/20: [0, 0.161]). Other scores (nats, shares of a prompt's answers) get value ±
    NORMAL_Z stderr. None without a value, or without prompts (a pass rate) or a stderr (another score)."""
    if value is None or _nan(value):
        return None
    passed = value * samples
    if metric in PASS_RATES and samples > 0 and abs(passed - round(passed)) < 1e-6:
        from scipy.stats import binomtest

        found = binomtest(round(passed), samples).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
        return found.low, found.high
    if stderr is None or _nan(stderr):
        return None
    return value - NORMAL_Z * stderr, value + NORMAL_Z * stderr


def comparison_frame(rows: list[EvalRow], baseline: str = BASELINE, metric: str | None = None):
    """Long form, one line per (model, task, context, variant): value, stderr, samples, status, the 95% interval
    (low, high: `interval`; None where it has none) and delta (value minus the baseline variant's on the same
    model, task and context; None without a baseline score).
    The metric is each task's primary one (acc; answer_nll for log-likelihood tasks) unless one is named.
    A later row of the same key replaces an earlier one (a rerun)."""
    import pandas as pd

    latest: dict[tuple, EvalRow] = {}
    for row in rows:
        if row.metric == (metric or primary_metric(row.task)):
            latest[(row.model, row.task, row.context, row.variant)] = row
    records = [
        {
            "model": r.model,
            "task": r.task,
            "context": r.context,
            "variant": r.variant,
            "metric": r.metric,
            "ratio_effective": r.ratio_effective,
            "value": r.value if r.status == OK else None,
            "stderr": r.stderr,
            "samples": r.samples,
            "status": r.status,
        }
        for r in latest.values()
    ]
    for record in records:
        found = interval(record["metric"], record["value"], record["stderr"], record["samples"])
        record["low"], record["high"] = found or (None, None)
    columns = [
        "model",
        "task",
        "context",
        "variant",
        "metric",
        "ratio_effective",
        "value",
        "stderr",
        "samples",
        "status",
        "low",
        "high",
    ]
    frame = pd.DataFrame(records, columns=columns)
    scores = {(r["model"], r["task"], r["context"], r["variant"]): r["value"] for r in records}

    def reference(record) -> str:
        key = (record["model"], record["task"], record["context"])
        same_run = baseline_of(record["variant"], baseline)
        return same_run if scores.get((*key, same_run)) is not None else baseline

    def delta(record) -> float | None:
        base = scores.get((record["model"], record["task"], record["context"], reference(record)))
        if base is None or record["value"] is None or _nan(record["value"]):
            return None
        return record["value"] - base

    frame["delta"] = [delta(r) for r in records]
    frame["baseline"] = [reference(r) for r in records]
    return frame


def baseline_of(variant: str, baseline: str = BASELINE) -> str:
    """The variant a row is compared with where it was run: a distilled student (`head:7:1:selected@RUN`) against
    the baseline distilled in the same run (`layer:3:1@RUN`: same tokens, steps and schedule), anything else
    against the baseline itself (also the student's fallback when its run's baseline has no score)."""
    _, at, run = variant.partition("@")
    return f"{baseline}@{run}" if at else baseline


def _nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def comparison_table(rows: list[EvalRow], baseline: str = BASELINE, metric: str | None = None) -> str:
    """Wide markdown: a line per (task, context), a column per variant (in the order first seen) holding
    'value (delta vs baseline)'; the baseline's own column holds its value. The header names the baseline only
    where it was run."""
    frame = comparison_frame(rows, baseline, metric)
    if frame.empty:
        return "(no eval rows)"
    import pandas as pd

    variants = list(dict.fromkeys(frame["variant"]))
    models = list(dict.fromkeys(frame["model"]))
    lines = []
    for (model, task, context), group in frame.groupby(["model", "task", "context"], sort=False):
        line = {"model": model, "task": task, "metric": group["metric"].iloc[0], "context": format_count(int(context))}
        by_variant = {r.variant: r for r in group.itertuples(index=False)}
        for variant in variants:
            line[variant] = _cell(by_variant.get(variant), variant == baseline_of(variant, baseline))
        lines.append(line)
    table = pd.DataFrame(lines)
    if len(models) == 1:
        table = table.drop(columns=["model"])
    which = metric or "each task's metric (acc, and retrieval_gain in nats per answer token: higher is better)"
    compared = set(frame.loc[frame["delta"].notna(), "baseline"])
    against = (f"; (delta) against {', '.join(sorted(compared))}" if compared
               else f" ({baseline} not run: no deltas)")  # fmt: skip
    return (f"{which} per task and context; [the 95% interval]: Wilson's score interval for acc (k of n prompts "
            f"answered), ±1.96 stderr for other scores{against}\n\n" + markdown_table(table))  # fmt: skip


def _cell(record, is_baseline: bool) -> str:
    if record is None:
        return ""
    if record.value is None or _nan(record.value):
        return record.status
    text = f"{record.value:.3f}"
    if record.low is not None and not _nan(record.low):
        text += f" [{record.low:.3f}, {record.high:.3f}]"
    if not is_baseline and record.delta is not None and not _nan(record.delta):
        text += f" ({record.delta:+.3f})"
    return text
