"""The plan dealt into shards: each point's measuring time estimated from its analytic FLOPs and bytes, then
the points dealt longest first to the shard where they end soonest (LPT), so that the shards finish together;
a shard pays a point's correctness check once per check group, so points that share one stay together where
that costs no balance.

Pure functions of the plan: shard i of N is the same on every rerun of the same command, which is what lets a
rerun submit only the shards that still have unfinished points.
"""

from dataclasses import dataclass

from hhbench.measure.timing import TimingPolicy
from hhbench.plan.grid import Point
from hhbench.runner.measurements import check_group
from hhbench.runner.point import base_row

# A nominal machine balance (an H200's dense bf16 rate and HBM bandwidth, from its datasheet) turns FLOPs and
# bytes into seconds; dealing only compares points with one another, so one balance serves every device.
PEAK_FLOPS = 989e12
PEAK_BYTES_PER_S = 4.8e12
POINT_OVERHEAD_S = 1.0  # building the workload, compilation and autotuning, the peak-memory run
CHECK_S = 2.0  # the correctness check at 256 tokens against the fp32 reference, once per check group and worker


def estimated_seconds(point: Point, policy: TimingPolicy) -> float:
    """Seconds a worker spends on `point`: a fixed overhead plus, for each timing it runs (the point; its FA
    and GDN parts alone with parts; its floor), warm-up and the timed samples the policy asks of one roofline
    step, max(FLOPs / PEAK_FLOPS, bytes / PEAK_BYTES_PER_S)."""
    row = base_row(point)
    step_s = max(row.flops_total / PEAK_FLOPS, row.bytes_moved / PEAK_BYTES_PER_S)
    timed_s = min(max(policy.target_ms / 1e3, policy.min_reps * step_s), policy.max_reps * step_s)
    timings = 1 + 2 * point.parts + point.floor
    return POINT_OVERHEAD_S + timings * (policy.warmup_ms / 1e3 + timed_s)


@dataclass(frozen=True)
class Shard:
    """One worker's or array task's share of a plan: shard `index` of `count`, its points and their estimated seconds."""

    index: int
    count: int
    points: tuple[Point, ...]  # in plan order
    seconds: float  # estimated: estimated_seconds summed, and CHECK_S per check group

    @property
    def name(self) -> str:
        """shard-I-of-N: its workers' and files' name, stable across reruns of the same plan and count."""
        return f"shard-{self.index}-of-{self.count}"


def _seconds(points: tuple[Point, ...], policy: TimingPolicy) -> float:
    return sum(estimated_seconds(p, policy) for p in points) + CHECK_S * len({check_group(p) for p in points})


def deal(points: list[Point], count: int, policy: TimingPolicy) -> list[Shard]:
    """`points` dealt into `count` shards, longest estimated point first to the shard where it would end
    soonest, a check (CHECK_S) counted where the shard has no point of its check group yet (ties: the lowest
    shard); each shard keeps plan order. Some shards are empty when there are fewer points than shards.
    Raises ValueError for count < 1."""
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    costs = [estimated_seconds(point, policy) for point in points]
    loads, members, groups = [0.0] * count, [[] for _ in range(count)], [set() for _ in range(count)]
    for index in sorted(range(len(points)), key=lambda i: -costs[i]):
        group = check_group(points[index])
        ends = [loads[s] + costs[index] + (CHECK_S if group not in groups[s] else 0.0) for s in range(count)]
        best = min(range(count), key=lambda s: (ends[s], s))
        loads[best] = ends[best]
        members[best].append(index)
        groups[best].add(group)
    return [Shard(s, count, tuple(points[i] for i in sorted(members[s])), loads[s]) for s in range(count)]


def unfinished(shards: list[Shard], done: set[tuple], policy: TimingPolicy) -> list[Shard]:
    """The shards that still have points without a row (`done`: Row.key of the run's rows), each cut to those
    points; a shard keeps its index and count, so that it keeps its name and files."""
    kept = []
    for shard in shards:
        left = tuple(point for point in shard.points if point.identity not in done)
        if left:
            kept.append(Shard(shard.index, shard.count, left, _seconds(left, policy)))
    return kept
