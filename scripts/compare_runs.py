"""Two runs of one plan side by side, as the multi-GPU evidence asks (docs/sweeps-multi-gpu.md): wall times,
key sets, each point's median against the other run's spread, and the medians' differences by pair of workers.

    python scripts/compare_runs.py REFERENCE CANDIDATE [--wall SECONDS SECONDS]

Wall time is each run's sessions' wall_s summed (recorded by `sweep --gpus/--launcher local`), or --wall. A point
agrees when both medians lie inside the other run's p10-p90 range; points ok in only one run are listed. Exit 0
where both runs hold the same keys, 1 where they do not, 2 for a folder that holds no run or files that do not read."""

import argparse
import sys
from collections import defaultdict

from scipy.stats import scoreatpercentile

from hhbench.errors import UserError
from hhbench.rows.runs import RunDir
from hhbench.rows.schema import KEY_FIELDS, OK

# what names a point in the lines below: the default suite's points differ in these alone (mode: sequential, streams)
NAMED = ("variant", "context", "batch", "pass_", "scope", "mode")


def wall_seconds(env: dict) -> float | None:
    """The wall_s of the sessions of a run's `env` (env.json) summed; None where one lacks it."""
    walls = [session.get("wall_s") for session in env.get("sessions", [])]
    return sum(walls) if walls and None not in walls else None


def sessions(env: dict) -> list[str]:
    """One line per session of a run's `env` (env.json): when, its wall time, its workers and command line ("?"
    where env.json predates their record)."""
    lines = []
    for number, session in enumerate(env.get("sessions", []), 1):
        wall, argv = session.get("wall_s"), session.get("argv")
        lines.append(f"  session {number}: {session.get('time')}, {'?' if wall is None else wall} s, workers "
                     f"{session.get('worker_count', '?')}, argv {'?' if argv is None else ' '.join(argv)}")  # fmt: skip
    return lines


def point(key: tuple) -> str:
    """A row key as the lines name its point (NAMED's fields)."""
    return " ".join(str(key[KEY_FIELDS.index(name)]) for name in NAMED)


def inside(value: float, row) -> bool:
    return row.latency_p10_ms <= value <= row.latency_p90_ms


def by_worker(reference: dict, candidate: dict, keys: list, apart: set) -> list[str]:
    """Markdown rows, one per pair of workers that measured the same points (reference worker, candidate worker):
    how many points, the median of candidate / reference latency - 1 with its p10-p90 (scipy's percentiles), and
    how many are apart. A device slower than another shows as a shift of its pairs alone."""
    pairs = defaultdict(list)
    for key in keys:
        pairs[(reference[key].worker or "-", candidate[key].worker or "-")].append(key)
    lines = []
    for (ours, theirs), found in sorted(pairs.items()):
        ratios = [candidate[key].latency_ms / reference[key].latency_ms - 1 for key in found]
        p10, median, p90 = scoreatpercentile(ratios, [10, 50, 90])
        lines.append(f"| {ours} | {theirs} | {len(found)} | {median:+.1%} ({p10:+.1%} to {p90:+.1%}) | "
                     f"{sum(key in apart for key in found)} |")  # fmt: skip
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference")
    parser.add_argument("candidate")
    parser.add_argument("--wall", nargs=2, type=float, metavar="SECONDS", help="wall times, reference and candidate")
    args = parser.parse_args()
    if args.wall and min(args.wall) <= 0:
        parser.error(f"--wall takes two positive seconds, got {args.wall[0]:g} and {args.wall[1]:g}")
    try:
        runs = [RunDir.open(args.reference), RunDir.open(args.candidate)]
        rows = [{row.key: row for row in run.rows()} for run in runs]
        envs = [run.env() for run in runs]
    except UserError as error:  # no run, or a rows.jsonl or env.json that does not read
        print(f"compare_runs.py: {error}", file=sys.stderr)
        return 2
    walls = args.wall or [wall_seconds(env) for env in envs]
    print("| run | rows | wall s |\n|---|---|---|")
    for run, keyed, wall in zip(runs, rows, walls, strict=True):
        print(f"| {run.path} | {len(keyed)} | {'' if wall is None else f'{wall:.1f}'} |")
    if None not in walls and 0 not in walls:  # sessions of under 0.05 s sum to 0.0: no ratio
        print(f"\nspeed-up: {walls[0] / walls[1]:.2f}x (reference wall / candidate wall)")
    for run, env in zip(runs, envs, strict=True):
        print(f"\n{run.path} sessions:", *sessions(env), sep="\n")
    for run, env in zip(runs, envs, strict=True):  # workers of a balanced launch finish together
        workers = env.get("workers", {})
        ends = ", ".join(f"{name} {w.get('time')} -> {w.get('finished')}" for name, w in sorted(workers.items()))
        print(f"\n{run.path} workers (last start -> finish): {ends or 'none recorded'}")
    only = [set(rows[0]) - set(rows[1]), set(rows[1]) - set(rows[0])]
    print(
        f"\nkey sets identical: {not any(only)} ({len(only[0])} only in the reference, {len(only[1])} only in the candidate)"
    )
    both = [key for key in rows[0] if key in rows[1]]
    measured = [key for key in both if rows[0][key].status == OK and rows[1][key].status == OK]
    status_differs = [key for key in both if rows[0][key].status != rows[1][key].status]
    apart = [key for key in measured if not (inside(rows[0][key].latency_ms, rows[1][key])
                                             and inside(rows[1][key].latency_ms, rows[0][key]))]  # fmt: skip
    print(f"medians within each other's p10-p90: {len(measured) - len(apart)} of {len(measured)} points ok in both")
    print("\n| reference worker | candidate worker | points | candidate / reference - 1: median (p10 to p90) | apart |")
    print("|---|---|---|---|---|", *by_worker(rows[0], rows[1], measured, set(apart)), sep="\n")
    for key in apart:
        a, b = rows[0][key], rows[1][key]
        print(f"  apart: {point(key)}: {a.latency_ms:.4g} ms [{a.latency_p10_ms:.4g}, "
              f"{a.latency_p90_ms:.4g}] vs {b.latency_ms:.4g} ms [{b.latency_p10_ms:.4g}, {b.latency_p90_ms:.4g}]")  # fmt: skip
    for key in status_differs:
        print(f"  status: {point(key)}: {rows[0][key].status} vs {rows[1][key].status}")
    return 0 if not any(only) else 1


if __name__ == "__main__":
    sys.exit(main())
