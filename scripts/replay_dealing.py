"""The dealing's cost model fitted on a measured multi-GPU sweep, and that sweep's measured point times replayed
through the dealing before the calibration and through the calibrated one (docs/sweeps-multi-gpu.md).

    python scripts/replay_dealing.py [RUN] [--workers 2 3 4]

RUN (default results/floor-targets-h200; results/default-h200x2-cold is the kernel-scope one) holds rows with
`worker` and `extra.point_s`, env.json naming its suite, and sweep.log (without it, one session), whose progress
lines give each session's row count: merge appends a session's rows worker by worker, each worker's in the order
it measured them, so a row's worker process is (session, worker). A row is its
setup group's cold first where its process had not measured the group and no earlier session had (the compile
caches were cold for it).

Fit (printed as the Costs literal of hhbench/launch/shards.py), one for each cost class of the run's rows (kernel
scope; layer and model scope): medians, see CALIBRATED's comment there, a median below zero as 0. A class whose
every row was its group's cold first prints `not fitted` and why (its point_s cannot be told from its setups).

Replay, not a measurement: a point takes its measured point_s, except a cold first, which takes the median
point_s of its group's other points (where it has none, its own, and its group no setup); a setup group's setup
is its cold firsts' median excess over that, paid once by every worker dealt one of its points. A worker's time is the sum; the makespan the
largest. Left out: two workers setting up one group at once (both paid, as measured: the replay charges both too)
or one after the other (the second finds the first's compile caches on disk and pays less: the replay charges it
fully), and the machine time between points.
"""

import argparse
import dataclasses
import math
import re
import statistics
import subprocess
import sys
import types
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from hhbench.errors import UserError
from hhbench.launch.shards import (
    CALIBRATED,
    Costs,
    cost_class,
    deal,
    estimated_seconds,
    roofline_shares,
    setup_group,
    setup_kind,
)
from hhbench.measure.timing import HOST_CALLS, TimingPolicy
from hhbench.plan.grid import load_suite
from hhbench.rows.runs import RunDir
from hhbench.rows.schema import OK
from hhbench.spec.axes import Scope

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "b28f9c5"  # main before the calibration: shards.py with POINT_OVERHEAD_S = 1 and CHECK_S = 2


def session_sizes(log: Path) -> list[int]:
    """Rows each session added: the final N of each `sweep ... N/M` progress line of sweep.log."""
    return [int(found[-1][0]) for line in log.read_text().splitlines() if line.startswith("sweep ")
            and (found := re.findall(r"(\d+)/(\d+)", line))]  # fmt: skip


def plan(run: RunDir, rows: list) -> tuple[list, TimingPolicy, dict]:
    """The run's suite as points (a point's backends as its row names them where `auto` resolves otherwise
    without a GPU), its timing policy, and each row's point by row key. UserError for a run of grid flags (no
    suite to replay) and for a suite point without a row (a partial run: its workers' times are not all known)."""
    name = run.env().get("suite")
    if name in (None, "custom"):
        raise UserError(f"{run.path}: a sweep of grid flags, not of a suite: there is no plan to replay")
    suite = load_suite(name, "cuda")
    # A point's backends as resolved here may differ from the GPU's: match it to its row on the key without the FA
    # backend first (the suite names GDN backends where it lists both), then without either.
    without_fa = {row.key[:7] + row.key[8:]: row for row in rows}
    without_both = {row.key[:7] + row.key[9:]: row for row in rows}
    points, missing = [], 0
    for point in suite.points:
        key = point.identity
        row = without_fa.get(key[:7] + key[8:]) or without_both.get(key[:7] + key[9:])
        if row is None:
            missing += 1
            continue
        points.append(dataclasses.replace(point, fa_backend=row.fa_backend, gdn_backend=row.gdn_backend))
    if missing:
        raise UserError(f"{run.path}: {missing} of the {len(suite.points)} points of suite {name!r} have no row: "
                        "the replay needs the whole suite measured")  # fmt: skip
    return points, suite.policy, {point.identity: point for point in points}


def cold_firsts(rows: list, sizes: list[int], point_of: dict) -> set[int]:
    """Indices of the rows that were their setup group's first in a worker process with cold caches for it."""
    firsts, before, start = set(), set(), 0
    for size in sizes:
        seen = defaultdict(set)
        for index in range(start, start + size):
            row, group = rows[index], setup_group(point_of[rows[index].key])
            if group not in seen[row.worker] and group not in before:
                firsts.add(index)
            seen[row.worker].add(group)
        before |= set().union(*seen.values())
        start += size
    return firsts


def estimated(row, point_of: dict, policy, costs: Costs) -> float:
    """The row's point's estimated seconds, with the host-time calls only where the row measured them."""
    return estimated_seconds(point_of[row.key], policy, costs, HOST_CALLS if "host_ms" in row.extra else 0)


def roofline_fractions(rows: list) -> tuple[float, float]:
    """(fa_roofline_fraction, roofline_fraction) fitted on `rows`: each row's measured step of one layer as its
    roofline's FA share over the one and the rest over the other (hhbench.launch.shards.roofline_shares),
    nonnegative least squares of the relative error. Where the rows leave a share no time (no FA, or no other,
    work in any of them; or a fit that puts one share at zero, which made its fraction infinite), both fractions
    are the one fitted on the whole roofline step. UserError without rows."""
    if not rows:
        raise UserError("no ok row: no measured step to fit the roofline fractions on")
    shares = np.array([roofline_shares(r) for r in rows]) / np.array([[r.latency_ms / 1e3] for r in rows])
    inverse, _ = nnls(shares, np.ones(len(rows)))
    if inverse.all():
        return 1 / inverse[0], 1 / inverse[1]
    (whole,), _ = nnls(shares.sum(axis=1, keepdims=True), np.ones(len(rows)))
    return 1 / whole, 1 / whole


def fit(rows: list, firsts: set[int], point_of: dict, policy) -> Costs:
    """The Costs of CALIBRATED's comment, fitted on `rows` (of one cost class; `firsts` indexes them). UserError
    where no row is ok, or every row was its setup group's cold first (its point_s holds its setup: no point_s
    to fit apart from it, as where each group has one point)."""
    later = [i for i in range(len(rows)) if i not in firsts]
    if not later:
        raise UserError("every point was its setup group's cold first: no point time to tell from a setup")
    fa_fraction, rest_fraction = roofline_fractions([r for r in rows if r.status == OK])
    compiles = defaultdict(list)
    for i in later:
        if rows[i].scope != Scope.KERNEL.value and rows[i].status == OK:
            compiles[rows[i].gdn_backend].append(rows[i].compile_ms / 1e3)
    costs = Costs(0.0, rest_fraction, fa_fraction, {},
                  {backend: statistics.median(found) for backend, found in sorted(compiles.items())})  # fmt: skip
    overhead = [rows[i].extra["point_s"] - estimated(rows[i], point_of, policy, costs) for i in later]
    # A median below zero is noise around no cost (warm caches: a group's first point no slower than its
    # others), and a negative setup would make deal() split groups to gain it.
    costs = dataclasses.replace(costs, point_s=max(0.0, statistics.median(overhead)))
    setups = defaultdict(list)
    for i in sorted(firsts):
        point = point_of[rows[i].key]
        kind = setup_kind(point)
        excess = rows[i].extra["point_s"] - estimated(rows[i], point_of, policy, costs)
        setups[kind].append(excess)
        setups[f"{kind} {point.gdn_backend}"].append(excess)
    return dataclasses.replace(
        costs, setup_s={kind: max(0.0, statistics.median(found)) for kind, found in setups.items()}
    )


def cost_classes(rows: list, firsts: set[int]) -> dict[str, tuple[list, set[int]]]:
    """`rows` by cost class (hhbench.launch.shards.cost_class of their scope): each class's rows and the indices
    among them of `firsts`, fit's arguments."""
    classes = defaultdict(list)
    for i, row in enumerate(rows):
        classes[cost_class(Scope(row.scope))].append(i)
    return {name: ([rows[i] for i in indices], {j for j, i in enumerate(indices) if i in firsts})
            for name, indices in sorted(classes.items())}  # fmt: skip


def rounded(costs: Costs) -> Costs:
    """The fit as CALIBRATED holds it: seconds to 0.1 (setups to 1 s), the roofline fractions to 0.01 or, below
    that, to their first significant digit (a CPU run's, about 1e-5, is not 0)."""
    return Costs(round(float(costs.point_s), 1), significant(costs.roofline_fraction),
                 significant(costs.fa_roofline_fraction),
                 {kind: round(s) for kind, s in costs.setup_s.items()},
                 {backend: round(s, 1) for backend, s in costs.first_call_s.items()})  # fmt: skip


def significant(fraction: float) -> float:
    """`fraction` (> 0) to 0.01, or to its first significant digit where that is below 0.01."""
    return round(float(fraction), max(2, -math.floor(math.log10(fraction))))


def measured_costs(rows: list, firsts: set[int], point_of: dict) -> tuple[dict, dict]:
    """Each point's replayed seconds by key, and each setup group's setup seconds."""
    later_by_group = defaultdict(list)
    for i, row in enumerate(rows):
        if i not in firsts:
            later_by_group[setup_group(point_of[row.key])].append(row.extra["point_s"])
    seconds, excess = {}, defaultdict(list)
    for i, row in enumerate(rows):
        group = setup_group(point_of[row.key])
        if i in firsts and later_by_group[group]:
            seconds[row.key] = statistics.median(later_by_group[group])
            excess[group].append(row.extra["point_s"] - seconds[row.key])
        else:
            seconds[row.key] = row.extra["point_s"]
    return seconds, {group: statistics.median(found) for group, found in excess.items()}


def replay(shards, seconds: dict, setup: dict) -> list[float]:
    """Each shard's replayed seconds: its points' measured seconds and its setup groups' setups."""
    return [sum(seconds[p.identity] for p in shard.points) + sum(setup.get(g, 0.0) for g in
            {setup_group(p) for p in shard.points}) for shard in shards]  # fmt: skip


def dealing_before():
    """hhbench/launch/shards.py as it was at BEFORE, read from git, as a module; None where git or the history
    holding BEFORE is missing (a shallow clone, an installed copy)."""
    try:
        source = subprocess.run(["git", "show", f"{BEFORE}:hhbench/launch/shards.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("shards_before")
    exec(compile(source, f"{BEFORE}:hhbench/launch/shards.py", "exec"), module.__dict__)
    return module


def worker_count(text: str) -> int:
    """A --workers value: a whole number >= 1 (argparse's one-line error otherwise)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a worker count is a whole number >= 1, not {text!r}")
    return int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=str(ROOT / "results" / "floor-targets-h200"))
    parser.add_argument("--workers", type=worker_count, nargs="+", default=[2])
    args = parser.parse_args()
    try:
        replay_run(RunDir.open(args.run), args.workers)
    except UserError as error:
        print(f"replay_dealing.py: {error}", file=sys.stderr)
        return 2
    return 0


def replay_run(run: RunDir, worker_counts: list[int]) -> None:
    """The fit on `run` and its replay on each of `worker_counts` workers, printed. Raises UserError for rows
    without point_s, a sweep.log whose sessions disagree with rows.jsonl, and a run that is not a whole suite's."""
    rows = list(run.rows())
    if any("point_s" not in row.extra for row in rows):
        raise UserError(f"{run.path}: rows without extra.point_s (a worker's seconds on the point): nothing to fit")
    log = run.path / "sweep.log"
    sizes = session_sizes(log) if log.exists() else [len(rows)]  # without a log: one session
    if sum(sizes) != len(rows):
        raise UserError(f"{run.path}: sweep.log's sessions add {sum(sizes)} rows, rows.jsonl has {len(rows)}")
    points, policy, point_of = plan(run, rows)
    firsts = cold_firsts(rows, sizes, point_of)
    print(f"fitted on {run.path} ({len(rows)} rows, sessions of {sizes} rows, {len(firsts)} cold firsts):")
    for name, (part, part_firsts) in cost_classes(rows, firsts).items():
        try:
            fitted = rounded(fit(part, part_firsts, point_of, policy))
        except UserError as error:  # the other class, and the replay, need no fit of this one
            print(f"  {name}: not fitted: {error}")
            continue
        verdict = "matches" if fitted == CALIBRATED[name] else f"differs: {CALIBRATED[name]}"
        print(f"  {name}: {fitted}\n  CALIBRATED[{name!r}] {verdict}")
    seconds, setup = measured_costs(rows, firsts, point_of)
    print("\nreplay of the measured point times (a group's setup once per worker it is dealt to):")
    print(f"  one worker: {sum(seconds.values()) + sum(setup.values()):.0f} s")
    before = dealing_before()
    if before is None:
        print(f"  (the dealing before, {BEFORE}, not replayed: git or that commit is not here)")
    for workers in worker_counts:
        dealings = [("calibrated", deal(points, workers, policy))]
        if before is not None:
            dealings.insert(0, ("before", before.deal(points, workers, policy)))
        for name, shards in dealings:
            times = replay(shards, seconds, setup)
            split = sum(1 for g in {setup_group(p) for p in points}
                        if sum(any(setup_group(p) == g for p in s.points) for s in shards) > 1)  # fmt: skip
            print(
                f"  {workers} workers, {name}: makespan {max(times):.0f} s; workers {', '.join(f'{t:.0f}' for t in times)}"
                f" s; {split} setup groups split; estimated {', '.join(f'{s.seconds:.0f}' for s in shards)} s"
            )


if __name__ == "__main__":
    raise SystemExit(main())
