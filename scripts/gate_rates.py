"""The latency gate's false-alarm and detection rates on repeated runs of one suite on one machine.

    python scripts/gate_rates.py RUN RUN [RUN ...] [--max-slowdown 5%] [--slowdown 1.15]

Every ordered pair of runs (a, b) is gated on latency alone, b against a: any failure is a false alarm (the runs
measured the same code). Then b's samples scaled by --slowdown are gated against a (detection across runs: the
slowdown plus the machine's run-to-run drift) and each run against itself scaled (detection within a run: the
slowdown against sampling noise alone). Rates are over the rows the gate tested (enough samples)."""

import argparse
import itertools
from dataclasses import replace

from hhbench.gate.check import gate, parse_slowdown
from hhbench.rows.runs import RunDir
from hhbench.rows.schema import RowSet


def slowed(rows: RowSet, factor: float) -> RowSet:
    scale = lambda value: None if value is None else value * factor  # noqa: E731
    return RowSet(
        replace(
            row,
            samples_ms=[s * factor for s in row.samples_ms],
            latency_ms=scale(row.latency_ms),
            latency_p10_ms=scale(row.latency_p10_ms),
            latency_p90_ms=scale(row.latency_p90_ms),
        )  # fmt: skip
        for row in rows
    )


def failures(baseline: RowSet, candidate: RowSet, max_slowdown: float) -> tuple[int, int]:
    """(latency failures, rows tested)."""
    report = gate(baseline, candidate, ["latency"], max_slowdown)
    measured = sum(row.status == "ok" for row in candidate)
    return len(report.failures), measured - len(report.latency_untested)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--max-slowdown", default="5%")
    parser.add_argument("--slowdown", type=float, default=1.15)
    args = parser.parse_args()
    threshold = parse_slowdown(args.max_slowdown)
    runs = {path: RunDir.open(path).rows() for path in args.runs}
    pairs = list(itertools.permutations(runs, 2))
    alarms = [failures(runs[a], runs[b], threshold) for a, b in pairs]
    across = [failures(runs[a], slowed(runs[b], args.slowdown), threshold) for a, b in pairs]
    within = [failures(rows, slowed(rows, args.slowdown), threshold) for rows in runs.values()]

    def rate(results) -> str:
        found, tested = sum(f for f, _ in results), sum(t for _, t in results)
        return f"{found}/{tested} rows ({found / max(tested, 1):.0%})"

    print(f"{len(runs)} runs, {len(pairs)} ordered pairs, --max-slowdown {threshold:.0%}")
    print(f"false alarms: {sum(f > 0 for f, _ in alarms)}/{len(pairs)} pairs, {rate(alarms)}")
    print(f"x{args.slowdown:g} detected across runs: {rate(across)}; within a run: {rate(within)}")


if __name__ == "__main__":
    main()
