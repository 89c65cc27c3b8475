"""The regression gate: a candidate run against a baseline run, row by row on the configuration key.

- flops, memory: the analytic fields must be equal, bit for bit (the cost model is deterministic; a change means
  the model changed, and the baseline is to be updated on purpose);
- presence: every baseline row must be in the candidate; new rows are listed;
- status: a row whose status changed fails unless it became ok; rows already `incorrect` in the baseline are
  listed, not failed (the gate finds regressions; the baseline recorded that defect on purpose);
- latency: a row is slower only when its median exceeds the baseline's by more than --max-slowdown (the minimum
  effect size) AND its repeated samples are slower than the baseline's by a one-sided Mann-Whitney U test (as asv
  does) at p < ALPHA / (rows tested) (Bonferroni: a gate of two runs of one distribution fails by chance at most
  ALPHA of the time); faster rows, by the mirror rule, are listed. A row whose sample counts cannot reach that
  p even when every sample of one run is slower than every sample of the other is listed as not tested.
"""

import json
import math
from dataclasses import asdict, dataclass, field, fields

from hhbench.errors import UserError
from hhbench.files import open_output
from hhbench.rows.schema import INCORRECT, OK, Row, RowSet
from hhbench.rows.sources import by_key, describe
from hhbench.spec.units import split_list

METRICS = ("flops", "memory", "presence", "status", "latency")
FLOPS_FIELDS = tuple(f.name for f in fields(Row) if f.name.startswith("flops_"))
MEMORY_FIELDS = ("kv_cache_bytes", "state_bytes", "weight_bytes", "bytes_moved")
ALPHA = 0.01  # family-wise false-alarm rate of the latency test, over all the rows one gate tests


@dataclass
class Finding:
    """One gate finding: the check (one of METRICS), the row described, what changed, and the two values."""

    check: str  # one of METRICS
    row: str  # the configuration, readable
    detail: str
    baseline: float | str | None = None
    candidate: float | str | None = None


@dataclass
class GateReport:
    """The verdict of a gate: rows compared, failures (which fail the gate), improvements, new, missing and
    still-incorrect rows, and rows whose latency could not be tested."""

    baseline: str
    candidate: str
    metrics: list[str]
    max_slowdown: float
    compared: int  # rows found in both runs
    failures: list[Finding] = field(default_factory=list)
    improvements: list[Finding] = field(default_factory=list)
    new_rows: list[str] = field(default_factory=list)
    missing_not_gated: list[str] = field(default_factory=list)  # missing rows while presence is not gated
    still_incorrect: list[Finding] = field(default_factory=list)  # incorrect in the baseline and the candidate
    latency_untested: list[str] = field(default_factory=list)  # too few samples for the latency test
    alpha: float = ALPHA

    @property
    def passed(self) -> bool:
        """True when nothing failed."""
        return not self.failures

    def to_dict(self) -> dict:
        """The report as JSON-ready data, with `passed`."""
        return {**asdict(self), "passed": self.passed}

    def to_json(self, path) -> None:
        """Write to_dict as JSON; raises UserError for an unwritable path."""
        with open_output(path, "w") as out:
            json.dump(self.to_dict(), out, indent=1)
            out.write("\n")

    def to_markdown(self) -> str:
        """The report for a reader: the verdict with the rules applied, then each list of findings."""
        count = len(self.failures)
        verdict = "PASS" if self.passed else f"FAIL ({count} regression{'s' if count > 1 else ''})"
        lines = [
            f"# Gate: {self.candidate} against {self.baseline}",
            "",
            f"{verdict}: {self.compared} rows compared on {', '.join(self.metrics)}"
            + (
                f"; latency: a median more than {self.max_slowdown:.1%} slower and samples slower by a one-sided "
                f"Mann-Whitney U test (p < {self.alpha:g} over the rows tested)."
                if "latency" in self.metrics
                else "."
            ),
        ]
        if any(finding.check in ("flops", "memory") for finding in self.failures):
            lines.append(
                "The analytic cost model changed: if that is intended, update the baseline on purpose (--update)."
            )
        lines += _section("Regressions", self.failures)
        lines += _section("Improvements", self.improvements)
        lines += _section("Still incorrect, as in the baseline", self.still_incorrect)
        lines += _list("New rows (not in the baseline)", self.new_rows)
        lines += _list("Missing rows (presence not gated)", self.missing_not_gated)
        lines += _list("Latency not tested (too few samples to reach the test's p)", self.latency_untested)
        return "\n".join(lines) + "\n"


def _section(title: str, findings: list[Finding]) -> list[str]:
    if not findings:
        return []
    lines = [
        "",
        f"## {title} ({len(findings)})",
        "",
        "| check | row | baseline | candidate | detail |",
        "|---|---|---|---|---|",
    ]
    for finding in findings:
        cells = [finding.check, finding.row, _cell(finding.baseline), _cell(finding.candidate), finding.detail]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _list(title: str, items: list[str]) -> list[str]:
    return ["", f"## {title} ({len(items)})", "", *[f"- {item}" for item in items]] if items else []


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def parse_metrics(text: str) -> list[str]:
    """--metrics text ('flops,latency') as names of METRICS, in METRICS' order. Raises UserError for none or an
    unknown one."""
    metrics = split_list(text)
    unknown = [name for name in metrics if name not in METRICS]
    if unknown or not metrics:
        raise UserError(f"bad --metrics {text!r}: choose from {', '.join(METRICS)}")
    return [name for name in METRICS if name in metrics]


def parse_slowdown(text: str) -> float:
    """'5%' or '0.05': a finite fraction >= 0 (NaN would pass every row); a bare number of 1 or more is ambiguous (5
    could mean 5% or 500%). Raises UserError for anything else."""
    stripped = text.strip()
    try:
        value = float(stripped.removesuffix("%")) / (100 if stripped.endswith("%") else 1)
    except ValueError:
        raise UserError(f"bad --max-slowdown {text!r}: write a percentage (5%) or a fraction (0.05)") from None
    if not 0 <= value < math.inf or (value >= 1 and not stripped.endswith("%")):
        raise UserError(f"bad --max-slowdown {text!r}: write a percentage (5%) or a fraction (0.05)")
    return value


def gate(
    baseline: RowSet,
    candidate: RowSet,
    metrics: tuple[str, ...] | list[str] = METRICS,
    max_slowdown: float = 0.05,
    names: tuple[str, str] = ("baseline", "candidate"),
) -> GateReport:
    """Gate `candidate` against `baseline` row by row on `metrics` (module docstring); `max_slowdown` is the least
    latency regression that counts (0.05: 5%). Raises UserError for two rows of one key in a run or no key in
    common."""
    base, cand = by_key(baseline, names[0]), by_key(candidate, names[1])
    common = [key for key in base if key in cand]
    if not common:
        raise UserError(f"{names[0]} and {names[1]} have no configuration in common")
    report = GateReport(names[0], names[1], list(metrics), max_slowdown, len(common))
    missing = [describe(row) for key, row in base.items() if key not in cand]
    if "presence" in metrics:
        report.failures += [Finding("presence", name, "missing from the candidate") for name in missing]
    else:
        report.missing_not_gated = missing
    report.new_rows = [describe(row) for key, row in cand.items() if key not in base]
    if "latency" in metrics:
        _latency(report, [(base[key], cand[key]) for key in common], max_slowdown)
    for key in common:
        old, new = base[key], cand[key]
        if "flops" in metrics:
            report.failures += _exact("flops", old, new, FLOPS_FIELDS)
        if "memory" in metrics:
            report.failures += _exact("memory", old, new, MEMORY_FIELDS)
        if "status" in metrics:
            _status(report, old, new)
    return report


def _exact(check: str, old: Row, new: Row, names: tuple[str, ...]) -> list[Finding]:
    changed = [name for name in names if getattr(old, name) != getattr(new, name)]
    if not changed:
        return []
    first = changed[0]
    detail = "changed: " + ", ".join(f"{name} {getattr(old, name)!r} -> {getattr(new, name)!r}" for name in changed)
    return [Finding(check, describe(new), detail, getattr(old, first), getattr(new, first))]


def _status(report: GateReport, old: Row, new: Row) -> None:
    why = f": {new.reason}" if new.reason else ""
    finding = Finding("status", describe(new), "", old.status, new.status)
    if new.status == old.status:
        if new.status == INCORRECT:
            finding.detail = f"output does not match the reference{why}"
            report.still_incorrect.append(finding)
    elif new.status == OK:
        finding.detail = "now measured"
        report.improvements.append(finding)
    else:
        finding.detail = f"status changed{why}"
        report.failures.append(finding)


def least_p(n_old: int, n_new: int) -> float:
    """The smallest one-sided Mann-Whitney U p-value two sample sets of these sizes can give (every sample of one
    above every sample of the other): 1 / C(n_old + n_new, n_old)."""
    return 1 / math.comb(n_old + n_new, n_old)


def _latency(report: GateReport, pairs: list[tuple[Row, Row]], max_slowdown: float) -> None:
    from scipy.stats import (
        mannwhitneyu,
    )  # here: scipy.stats takes seconds to import, and every command loads this module

    measured = [
        (old, new)
        for old, new in pairs
        if old.status == OK and new.status == OK and old.latency_ms is not None and new.latency_ms is not None
    ]
    tested = sum(min(len(old.samples_ms), len(new.samples_ms)) >= 2 for old, new in measured)
    threshold = report.alpha / max(tested, 1)
    for old, new in measured:
        n_old, n_new = len(old.samples_ms), len(new.samples_ms)
        if min(n_old, n_new) < 2 or least_p(n_old, n_new) >= threshold:
            report.latency_untested.append(f"{describe(new)} ({n_old} and {n_new} samples)")
            continue
        change = new.latency_ms / old.latency_ms - 1
        slower = mannwhitneyu(new.samples_ms, old.samples_ms, alternative="greater").pvalue
        faster = mannwhitneyu(new.samples_ms, old.samples_ms, alternative="less").pvalue
        detail = f"{change:+.1%} median; Mann-Whitney U p={min(slower, faster):.2g} ({n_old} and {n_new} samples)"
        if change > max_slowdown and slower < threshold:
            report.failures.append(
                Finding("latency", describe(new), "slower " + detail, old.latency_ms, new.latency_ms)
            )
        elif change < -max_slowdown and faster < threshold:
            report.improvements.append(
                Finding("latency", describe(new), "faster " + detail, old.latency_ms, new.latency_ms)
            )
