"""The plan dealt into shards: each point's time on a worker estimated by a cost model calibrated on a measured
sweep, then the points dealt setup group by setup group, largest first, to the shard where they end soonest (LPT),
so that the shards finish together.

What dominates a worker's time from cold compile caches is paid once per setup group (the points but for their
context and batch, see setup_group): the group's first point on a worker compiles and autotunes its kernels, runs
the correctness check and builds the floor's parts, 67-201 s for a layer prefill or training point on an H200,
where the group's later points take 1-22 s. A group split over two workers pays that twice, so a group stays on
one worker unless splitting it ends the shards sooner.

Pure functions of the plan: shard i of N is the same on every rerun of the same command, which is what lets a
rerun submit only the shards that still have unfinished points.
"""

import dataclasses
from collections import Counter
from dataclasses import dataclass

from hhbench.bench.workloads import timed_layers
from hhbench.measure.timing import HOST_CALLS, TimingPolicy
from hhbench.plan.grid import Point
from hhbench.runner.measurements import PROFILE_STEPS, PROFILE_WARM_CALLS, check_group
from hhbench.runner.point import base_row
from hhbench.spec.axes import SEQUENTIAL, Pass, Scope

# A nominal machine balance (an H200's dense bf16 rate and HBM bandwidth, from its datasheet) turns FLOPs and
# bytes into a roofline step time; dealing only compares points with one another, so one balance serves every device.
PEAK_FLOPS = 989e12
PEAK_BYTES_PER_S = 4.8e12


@dataclass(frozen=True)
class Costs:
    """Seconds a worker spends, as deal() models them. Per point: `point_s` (building its workload, its
    peak-memory run, writing its row), `first_call_s[gdn_backend]` at layer and model scope (what a point's first
    call compiles and tunes although its group is set up: FIRST_CALL below says why fla-chunk's is large), and each
    timing's warm-up and samples of a step (step_seconds: the FA cores' share of the roofline at
    `fa_roofline_fraction` of its speed, the rest at `roofline_fraction`). Per setup group, once on each worker
    that measures one of its points: setup_seconds."""

    point_s: float
    roofline_fraction: float  # roofline step time / measured step time, but for the FA cores' share
    fa_roofline_fraction: float  # the same of the FA cores' share (cuDNN runs near its roofline, fla's GDN far off)
    setup_s: dict[str, float]  # by kind ("prefill", "train", "decode"; "model" at model scope), and kind and backend
    first_call_s: dict[str, float]  # by GDN backend, layer and model scope


# FIRST_CALL: why fla-chunk pays first_call_s at nearly every new context length at layer and model scope (read in fla
# 0.6.0 and Triton 3.6; results/floor-targets-h200: 14-18 s of compile_ms a point). Not fla's chunk kernels: they take T
# at run time (@triton.jit(do_not_specialize=['T']), e.g. fla/ops/common/chunk_o.py:57) and tune on head counts and
# sizes (key=['H', 'HV', 'K', 'V', 'BT', ...], line 56), so kernel-scope points, whose q and k arrive normalized,
# compile nothing at a new T (results/gpu-default-h100, 8K-128K: compile_ms 0.0-0.5 s prefill, 0.0-1.5 s training). The
# layer's fused path asked fla for the q/k L2 norm (since slot_conv only in training: a prefill without gradients
# normalizes q and k in hhbench's own kernel, and its head norms in head_norms, which take T as a run-time argument
# (Triton compiles anew only for T = 1 or T's divisibility by 16); the fit below predates that and charges prefill as
# before) (use_qk_l2norm_in_kernel=True, hydrahead.py; fla's
# ops/gated_delta_rule/chunk.py:282-284, backward 383-385), and fla's l2norm_fwd and l2norm_bwd put the B*T*H rows in
# buckets of 65536, NB = cdiv(rows, 65536), a tl.constexpr in the tuning key (fla/modules/norm/l2norm.py:63-69, 87-93,
# 129-136, 157-164): a new bucket compiles and benchmarks all 25 configs of the kernel (5 BT x 5 num_warps, line 64),
# each a binary of its own. A suite's doubling contexts each land in a bucket of their own once B*T*H passes 65536; up
# to there the bucket is 1, which the 256-token correctness check has tuned. A point whose bucket was tuned before on
# its worker pays about nothing (layer 3:1 at 16K after head 7:1 at 16K, both bucket 4: 0.1 s). The layer's gated
# RMSNorm and RMSNorm, on both GDN backends, bucket the same way with 6-9 configs each
# (fla/modules/norm/fused_norm_gate.py:30-35 and 482-484, cdiv(rows, 65536); layernorm.py:38-47 and 423-424,
# cdiv(rows, 2048)).
# The cause is in fla: no argument of chunk_gated_delta_rule keeps its norm from bucketing. The dealing does not model
# buckets (every layer- and model-scope point is charged first_call_s); keeping a setup group's contexts on one worker,
# as deal does, saves none of it, each context being a bucket of its own. tests/test_gpu.py checks on a GPU that only
# the norm compiles at a new context, and only for a new bucket. flash-qla's first_call_s is low because in that run
# its points at new contexts started after the fla-chunk worker had tuned the same norm buckets into the shared
# Triton cache; two that did not paid 3.1 and 4.3 s.
#
# Fitted by scripts/replay_dealing.py, medians, one Costs for each cost class (cost_class: kernel scope apart from
# layer and model scope, whose steps carry a layer's projections and glue and whose setups its floor's parts too):
# the two roofline fractions, least squares (scipy's nnls) of every row's measured step as its FA cores' share of the
# roofline step over fa_roofline_fraction and the rest over roofline_fraction, relative errors; first_call_s, by GDN backend, of the
# compile_ms of the layer- and model-scope points that were not their setup group's first from cold caches;
# point_s of those points' time beyond that and their timed samples; setup_s, by kind and by kind and backend, of
# the first points' time beyond their per-point estimate (a median below zero, noise on warm caches, as 0).
# "layer": results/floor-targets-h200 (49 layer- and model-scope points of suites/floor-h200.toml, two H200s, cold
# Triton and TileLang caches; each row's extra.point_s, compile_ms and latency; the sessions' rows told apart by
# sweep.log). "kernel": results/default-h200x2-cold (the 196 points of suites/default.toml, two H200s, cold caches):
# a kernel-scope setup is what fla's Triton autotuning and the fp32 check cost, about 1 s for prefill and decode and
# 38 s for training (its backward kernels' tuning), against 60-174 s at layer scope.
CALIBRATED = {
    "layer": Costs(
        point_s=1.6,
        roofline_fraction=0.24,
        fa_roofline_fraction=0.64,
        setup_s={
            "prefill": 91,
            "prefill fla-chunk": 60,
            "prefill flash-qla": 101,
            "train": 105,
            "train fla-chunk": 90,
            "train flash-qla": 174,
            "decode": 9,
            "decode fla-recurrent": 9,
            "model": 45,
            "model flash-qla": 45,
        },
        first_call_s={"fla-chunk": 14.2, "fla-recurrent": 0.0, "flash-qla": 0.2},
    ),
    "kernel": Costs(
        point_s=1.1,
        roofline_fraction=0.08,
        fa_roofline_fraction=0.64,
        setup_s={
            "decode": 1,
            "decode fla-recurrent": 1,
            "train": 38,
            "train fla-chunk": 38,
            "prefill": 1,
            "prefill fla-chunk": 1,
        },
        first_call_s={},
    ),
}
FITTED_ON = {"layer": "floor-targets-h200", "kernel": "default-h200x2-cold"}  # runs under results/


def cost_class(scope: Scope) -> str:
    """The key of CALIBRATED whose costs a point of `scope` takes: "kernel", or "layer" (layer and model scope)."""
    return "kernel" if scope is Scope.KERNEL else "layer"


def costs_of(point: Point, costs: Costs | None) -> Costs:
    """`costs` where given, else the calibrated costs of `point`'s cost class."""
    return costs if costs is not None else CALIBRATED[cost_class(point.scope)]


def setup_group(point: Point) -> tuple:
    """What a worker compiles, autotunes and checks once: the check group (hhbench.runner.measurements.check_group:
    the point but for its ratio text, context and batch) but for the head-level mode, as two streams run the
    kernels of one."""
    return check_group(dataclasses.replace(point, mode=SEQUENTIAL))


def setup_kind(point: Point) -> str:
    """The kind of setup costs.setup_s holds for `point`: "model" at model scope, else its pass."""
    return "model" if point.scope is Scope.MODEL else point.pass_.value


def setup_seconds(point: Point, costs: Costs | None = None) -> float:
    """Seconds the first point of `point`'s setup group costs a worker beyond its own: costs.setup_s of its kind
    (setup_kind) and GDN backend, else of its kind. Default costs: its cost class's calibration, or where that was
    fitted without its kind and backend and another class's was not, that one's."""
    kind = setup_kind(point)
    key = f"{kind} {point.gdn_backend}"
    if costs is None:
        # default-h200x2-cold ran without FlashQLA: a kernel-scope FlashQLA group would take fla-chunk's 1 s where
        # TileLang compiles its kernels (the layer scope's FlashQLA setups are 41-84 s above fla-chunk's)
        fitted = [costs_of(point, None), *CALIBRATED.values()]
        costs = next((c for c in fitted if key in c.setup_s), fitted[0])
    return costs.setup_s.get(key, costs.setup_s[kind])


def roofline_shares(row) -> tuple[float, float]:
    """A row's roofline step of one layer, max(FLOPs / PEAK_FLOPS, bytes / PEAK_BYTES_PER_S), split by FLOPs into
    its FA cores' share and the rest: (seconds, seconds)."""
    roofline_s = max(row.flops_total / PEAK_FLOPS, row.bytes_moved / PEAK_BYTES_PER_S)
    fa_share = row.flops_fa_core / row.flops_total if row.flops_total else 0.0
    return roofline_s * fa_share, roofline_s * (1 - fa_share)


def step_seconds(point: Point, costs: Costs | None = None) -> float:
    """Seconds one timed run of `point` takes, as modelled: its layers (timed_layers) each at the FA cores' share
    of the roofline over costs.fa_roofline_fraction and the rest over costs.roofline_fraction (costs default: its
    cost class's calibration)."""
    costs = costs_of(point, costs)
    fa_s, rest_s = roofline_shares(base_row(point))
    return timed_layers(point) * (fa_s / costs.fa_roofline_fraction + rest_s / costs.roofline_fraction)


def estimated_seconds(
    point: Point, policy: TimingPolicy, costs: Costs | None = None, host_calls: int = HOST_CALLS
) -> float:
    """Seconds a worker spends on `point` once its setup group is set up (costs default: its cost class's
    calibration): costs.point_s, the backend's first-call compile at layer and model scope, and for each timing it
    runs (the point; its FA and GDN parts alone with parts; its floor) the warm-up and the timed samples the policy
    asks of one step (step_seconds); with profile, its warm and profiled calls (profiler overhead not modelled);
    eager points (not decode, no [timing] graph), the `host_calls` their host time takes (a fit on rows measured
    before host_ms existed passes 0)."""
    costs = costs_of(point, costs)
    step_s = step_seconds(point, costs)
    timed_s = min(max(policy.target_ms / 1e3, policy.min_reps * step_s), policy.max_reps * step_s)
    timings = 1 + 2 * point.parts + point.floor
    compile_s = costs.first_call_s.get(point.gdn_backend, 0.0) if point.scope is not Scope.KERNEL else 0.0
    profile_s = point.profile * (PROFILE_WARM_CALLS + PROFILE_STEPS) * step_s
    host_s = (point.pass_ is not Pass.DECODE and not policy.graph) * host_calls * step_s
    return costs.point_s + compile_s + timings * (policy.warmup_ms / 1e3 + timed_s) + profile_s + host_s


@dataclass(frozen=True)
class Shard:
    """One worker's or array task's share of a plan: shard `index` of `count`, its points and their estimated seconds."""

    index: int
    count: int
    points: tuple[Point, ...]  # in plan order
    seconds: float  # estimated: estimated_seconds summed, and the setup of each of its setup groups

    @property
    def name(self) -> str:
        """shard-I-of-N: its workers' and files' name, stable across reruns of the same plan and count."""
        return f"shard-{self.index}-of-{self.count}"


def shard_seconds(points: tuple[Point, ...], policy: TimingPolicy, costs: Costs | None = None) -> float:
    """A worker's estimated seconds on `points`: each point's estimated_seconds, and each setup group's setup once."""
    firsts = {setup_group(p): p for p in points}.values()
    return sum(estimated_seconds(p, policy, costs) for p in points) + sum(setup_seconds(p, costs) for p in firsts)


def deal(points: list[Point], count: int, policy: TimingPolicy, costs: Costs | None = None) -> list[Shard]:
    """`points` dealt into `count` shards: whole setup groups (their setup and their points' estimated seconds),
    largest first, each to the shard that ends soonest; then, while it ends the last shard sooner, one point moved
    from the last shard to the first to end (paying its group's setup there where the group is new to it). So a
    group is split only where that shortens the makespan. Deterministic (ties: plan order, the lowest shard); each
    shard keeps plan order; some are empty when there are fewer groups than shards. Raises ValueError for count < 1."""
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    cost = [estimated_seconds(point, policy, costs) for point in points]
    group_of = [setup_group(point) for point in points]
    setup = {group: setup_seconds(point, costs) for group, point in zip(group_of, points, strict=True)}
    groups: dict[tuple, list[int]] = {}  # in plan order
    for index, group in enumerate(group_of):
        groups.setdefault(group, []).append(index)
    members: list[list[int]] = [[] for _ in range(count)]
    held = [Counter() for _ in range(count)]  # each shard's points per setup group
    loads = [0.0] * count
    for group, indices in sorted(groups.items(), key=lambda item: -(setup[item[0]] + sum(cost[i] for i in item[1]))):
        best = min(range(count), key=lambda s: (loads[s], s))
        members[best] += indices
        held[best][group] += len(indices)
        loads[best] += setup[group] + sum(cost[i] for i in indices)

    def moved(i: int, source: int, target: int) -> tuple[float, float]:
        """The loads of shards `source` and `target` with point i moved from the one to the other."""
        group = group_of[i]
        return (loads[source] - cost[i] - (setup[group] if held[source][group] == 1 else 0.0),
                loads[target] + cost[i] + (setup[group] if not held[target][group] else 0.0))  # fmt: skip

    while True:  # each move lowers the longest shard, so this ends
        last = max(range(count), key=lambda s: (loads[s], -s))
        first = min(range(count), key=lambda s: (loads[s], s))
        move = min(members[last], key=lambda i: (max(moved(i, last, first)), i), default=None)
        if move is None or max(moved(move, last, first)) >= loads[last] - 1e-9:
            break
        loads[last], loads[first] = moved(move, last, first)
        members[last].remove(move)
        members[first].append(move)
        held[last][group_of[move]] -= 1
        held[first][group_of[move]] += 1
    return [Shard(s, count, tuple(points[i] for i in sorted(members[s])), loads[s]) for s in range(count)]


def unfinished(shards: list[Shard], done: set[tuple], policy: TimingPolicy) -> list[Shard]:
    """The shards that still have points without a row (`done`: Row.key of the run's rows), each cut to those
    points; a shard keeps its index and count, so that it keeps its name and files."""
    kept = []
    for shard in shards:
        left = tuple(point for point in shard.points if point.identity not in done)
        if left:
            kept.append(Shard(shard.index, shard.count, left, shard_seconds(left, policy)))
    return kept
