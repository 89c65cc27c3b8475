"""What is measured on a point, one unit per measurement, registered in the order they run (the tracker of
optimum-benchmark's backend / scenario / tracker split): each unit reads the Trial and writes its own fields of the
row, so a new measurement is one function here. A unit that decides the row's status (oom by the analytic memory bound,
unavailable, unsupported, incorrect) ends the point's required units; the row is `ok` when they all ran. Units marked `addition` run after
the point's workload is freed, and only their own fields depend on them: their failure is kept in
extra["<name>_error"] and the row keeps its latency (hhbench.runner.point.measure_point runs them): the floor, and
the kernel profile, which is never taken while the point is timed (the profiler's overhead stays out of latency)."""

import contextlib
import dataclasses
import gc
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hhbench.analytic.flops import tokens
from hhbench.bench import workloads
from hhbench.bench.floor import floor_layers, floor_parts
from hhbench.kernels import registry
from hhbench.measure.profile import kernel_kinds, profile_kernels
from hhbench.measure.timing import (
    L2Flusher,
    Timing,
    TimingPolicy,
    host_ms,
    peak_memory_bytes,
    time_callable,
    time_each,
)
from hhbench.names import Registry
from hhbench.plan.grid import Point
from hhbench.rows import schema
from hhbench.rows.schema import Row
from hhbench.spec.axes import Pass, Scope, dtype_bytes
from hhbench.spec.layout import build_plan

CHECK_CONTEXT = 256  # small enough for the token-by-token oracle, several GDN chunks long
TOLERANCE = {"bf16": 5e-2, "fp16": 2e-2, "fp32": 5e-3}  # max relative error, outputs and gradients
REFERENCE = {registry.FA: "sdpa-math", registry.GDN: "torch-recurrent"}
# Crosscheck only steps at least this long: shorter ones are launch- and CPU-bound, and two timers then
# disagree by their jitter rather than by their method.
CROSSCHECK_MIN_MS = 2.0
PROFILE_STEPS = 5  # profiled calls of the point's step, after PROFILE_WARM_CALLS untimed ones
PROFILE_WARM_CALLS = 3
PROFILE_TOP = 12  # kernels listed by name in extra.kernels; the rest summed as "other"
GIB = 2**30


@dataclass
class Trial:
    """One point being measured: what the units read (point, device, policy, the sweep's correctness cache and
    whether to crosscheck) and share (the row, the point's workload and its timing)."""

    point: Point
    device: torch.device
    policy: TimingPolicy
    row: Row
    checked: dict  # the sweep's correctness results by configuration: a backend pair is checked once per plan
    crosscheck: bool = False
    timing: Timing | None = None
    _workload: workloads.Workload | None = field(default=None, repr=False)

    @property
    def workload(self) -> workloads.Workload:
        """The point's workload at its context and batch, built on first use."""
        if self._workload is None:
            self._workload = workloads.build(self.point, self.device)
        return self._workload

    def policy_of(self, graph: bool) -> TimingPolicy:
        """The sweep's timing policy, capturing CUDA graphs where the workload asks (`graph`: decode on CUDA) or the
        sweep does ([timing] graph = true: every step timed as graph replays, without the host's launch cost)."""
        return dataclasses.replace(self.policy, graph=self.policy.graph or graph)

    def free(self) -> None:
        """Drop the workload and give its memory back (between units that need the device's memory whole)."""
        self._workload = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class Measurement:
    """One registered measurement: its name, the fields it writes, the function that writes them."""

    name: str
    fields: tuple[str, ...]  # the row fields, and extra.<key>s, it writes
    run: Callable[[Trial], None]
    addition: bool = False  # runs after the workload is freed; its failure costs the row only its own fields


MEASUREMENTS: Registry = Registry("measurement")


@contextlib.contextmanager
def heap_frozen():
    """Within it, the objects alive on entry (torch's, hhbench's and the caller's modules and objects) are frozen out
    of Python's collector (gc.freeze): Trial.free's full collection, run two to four times a point, then walks only
    what the points made. Unfrozen, each walked the whole heap: 0.13 s a collection in a fresh `hhbench sweep`
    process, half the CPU suite's time on a 2-core machine (29 of 58 s), and more in a process that has imported
    more. Garbage is collected before the freeze, so none is kept; on exit the objects are unfrozen. Where the heap
    is frozen already (a caller's gc.freeze) it is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def measurement(name: str, fields: tuple[str, ...], addition: bool = False):
    """Decorator: register `fn(trial)` as the measurement `name` writing `fields`, after those registered before
    it. A name registered twice is a ValueError."""

    def wrap(fn: Callable[[Trial], None]) -> Callable[[Trial], None]:
        MEASUREMENTS[name] = Measurement(name, fields, fn, addition)
        return fn

    return wrap


def check_group(point: Point) -> tuple:
    """What one correctness check covers: the point but for its ratio text, context and batch (the check runs at a
    small context and batch of its own), so a sweep checks each group once and a launcher keeps a group together."""
    return (point.shape, point.spec, point.pass_, point.scope, point.dtype, point.fa_backend, point.gdn_backend,
            point.mode)  # fmt: skip


def needed_backends(point: Point) -> list[registry.Backend]:
    """The backends the point runs: FA where its plan has FA heads, GDN where it has GDN heads."""
    plan = build_plan(point.shape, point.spec)
    needed = []
    if plan.fa_heads:
        needed.append(registry.get(point.fa_backend, registry.FA))
    if plan.la_heads:
        needed.append(registry.get(point.gdn_backend, registry.GDN))
    return needed


def available_bytes(device: torch.device) -> float:
    """Memory a point may still take on `device`, in bytes: CUDA's free memory (torch.cuda.mem_get_info), or
    the CPU's available RAM (MemAvailable of /proc/meminfo, else os.sysconf's available pages; the host's
    figure, so a container's lower limit is not seen: the check stays on the side of running)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024  # the file says kB: KiB
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def resident_lower_bound(point: Point, row: Row) -> float:
    """Fewest bytes the point's workload holds at once, from the row's analytic costs (bytes): a lower bound,
    so that refusing a point above it never refuses one that fits.

    Kernel scope: every input and output of the attention cores (bytes_moved of one forward: the timed workload
    holds them all between repetitions). Layer and model scope: the weights, the input activations
    (batch x tokens x hidden), and the KV of one layer (K and V exist while its core runs; the average layer's,
    below the largest), or for decode the whole KV cache and GDN state the step reads (kv_cache_bytes and
    state_bytes). Everything else (intermediates, gradients, allocator slack) is left out."""
    if point.scope is Scope.KERNEL:
        return row.bytes_moved / (3 if point.pass_ is Pass.TRAIN else 1)  # training moves 3x one forward's inputs
    shape, nbytes = point.shape, dtype_bytes(point.dtype)
    held = row.weight_bytes + point.batch * tokens(point.pass_, point.context) * shape.hidden * nbytes
    if point.pass_ is Pass.DECODE:
        return held + row.kv_cache_bytes + row.state_bytes
    return held + row.kv_cache_bytes / (shape.n_layers if point.scope is Scope.MODEL else 1)


def memory_refusal(point: Point, row: Row, device: torch.device) -> str:
    """Why the point is not run (its lower bound on memory exceeds what the device has available), or ""."""
    needed, available = resident_lower_bound(point, row), available_bytes(device)
    if needed <= available:
        return ""
    return (
        f"not run: needs at least {needed / GIB:.3g} GiB (analytic lower bound), {device.type} has "
        f"{available / GIB:.3g} GiB available"
    )


@measurement("fit", ("status", "reason"))
def fit(trial: Trial) -> None:
    """A point whose analytic lower bound on memory exceeds what the device has available is not run: its row
    says oom and why (measured, it would be killed: the CPU's OOM killer leaves no row; or fail on allocation)."""
    refusal = memory_refusal(trial.point, trial.row, trial.device)
    if refusal:
        trial.row.status, trial.row.reason = schema.OOM, refusal


@measurement("availability", ("status", "reason", "gdn_impl"))
def availability(trial: Trial) -> None:
    """Each needed backend runs on this machine and takes the point's pass, dtype and head dim; else the row is
    unavailable or unsupported, with the backend's reason. gdn_impl: what the GDN backend runs for the pass."""
    point, row = trial.point, trial.row
    backends = needed_backends(point)
    for backend in backends:
        reason = backend.unavailable(trial.device.type)
        if reason:
            row.status, row.reason = schema.UNAVAILABLE, f"{backend.name}: {reason}"
            return
        reason = backend.unsupported(point.pass_.value, point.dtype, point.shape.head_dim)
        if reason:
            row.status, row.reason = schema.UNSUPPORTED, reason
            return
    row.gdn_impl = next((b.implementation(point.pass_.value) for b in backends if b.kind == registry.GDN), "")


def relative_error(test: torch.Tensor, ref: torch.Tensor) -> float:
    """||test - ref|| / ||ref|| in float64 (the absolute error where ref is 0); inf where test is not finite."""
    test, ref = test.detach().double(), ref.detach().double()
    if not torch.isfinite(test).all():
        return math.inf
    denominator = ref.norm().item()
    return (test - ref).norm().item() / denominator if denominator else (test - ref).norm().item()


def check_correctness(point: Point, device: torch.device) -> float:
    """Max relative error of the point's backends against the fp32 reference on the same inputs and weights, at
    a small context (outputs, and gradients for training)."""
    context = min(point.context, CHECK_CONTEXT)
    batch = min(point.batch, 2)
    test = workloads.build(point, device, context, batch).outputs()
    ref = workloads.build(
        point, device, context, batch, REFERENCE[registry.FA], REFERENCE[registry.GDN], reference=True
    ).outputs()
    return max(relative_error(t, r) for t, r in zip(test, ref, strict=True))


@measurement("correctness", ("max_rel_err", "status", "reason"))
def correctness(trial: Trial) -> None:
    """max_rel_err against the fp32 reference (check_correctness), once per configuration of the sweep; beyond
    the dtype's TOLERANCE the row is incorrect and never timed."""
    point, row = trial.point, trial.row
    key = check_group(point)
    if key not in trial.checked:
        trial.checked[key] = check_correctness(point, trial.device)
        trial.free()
    row.max_rel_err = trial.checked[key]
    if not row.max_rel_err <= TOLERANCE[point.dtype]:
        row.status = schema.INCORRECT
        row.reason = f"relative error {row.max_rel_err:.3g} against the fp32 reference exceeds {TOLERANCE[point.dtype]}"


@measurement("timing", ("samples_ms", "latency_ms", "latency_p10_ms", "latency_p90_ms", "reps", "timer",
                        "compile_ms", "extra.unit_layers", "extra.timing_notes"))  # fmt: skip
def timing(trial: Trial) -> None:
    """The workload timed (hhbench.measure.timing), per layer where the timed unit holds several: ms."""
    workload, row = trial.workload, trial.row
    trial.timing = found = time_callable(workload.run, trial.device, trial.policy_of(workload.graph))
    per_layer = workload.layers_per_run
    row.samples_ms = [s / per_layer for s in found.samples_ms]
    row.latency_ms = found.median_ms / per_layer
    row.latency_p10_ms = found.percentile(0.1) / per_layer
    row.latency_p90_ms = found.percentile(0.9) / per_layer
    row.reps, row.timer, row.compile_ms = len(found.samples_ms), found.timer, found.compile_ms
    if per_layer > 1:
        row.extra["unit_layers"] = per_layer
    if found.notes:
        row.extra["timing_notes"] = found.notes


@measurement("host", ("extra.host_ms",))
def host(trial: Trial) -> None:
    """On CUDA, for a workload timed eagerly (not as a CUDA graph): the host time to issue one run, per layer like
    the latency (hhbench.measure.timing.host_ms). Near the latency, the point is host-bound."""
    workload = trial.workload
    if trial.policy_of(workload.graph).graph:
        return
    found = host_ms(workload.run, trial.device)
    if found is not None:
        trial.row.extra["host_ms"] = found / workload.layers_per_run


@measurement("memory", ("peak_mem_bytes", "extra.peak_mem"))
def memory(trial: Trial) -> None:
    """Peak device memory of one run of the workload, bytes (CUDA only; the CPU's row says so)."""
    trial.row.peak_mem_bytes = peak_memory_bytes(trial.workload.run, trial.device)
    if trial.row.peak_mem_bytes is None:
        trial.row.extra["peak_mem"] = "not measured on the CPU (analytic memory only)"


@measurement("throughput", ("tflops", "gbps"))
def throughput(trial: Trial) -> None:
    """Analytic FLOPs and bytes over the median latency: TFLOP/s and GB/s (decimal units)."""
    row = trial.row
    seconds = row.latency_ms * 1e-3
    row.tflops = row.flops_total / seconds / 1e12
    row.gbps = row.bytes_moved / seconds / 1e9


@measurement("parts", ("extra.parts_ms", "extra.vs_parts_sum"))
def parts(trial: Trial) -> None:
    """Kernel-scope head-level points asked for parts: each backend alone on its heads (median ms), and the
    latency over their sum (above 1: running them together costs more than the parts)."""
    workload, row = trial.workload, trial.row
    if not workload.parts:
        return
    times = time_each(workload.parts, trial.device, trial.policy_of(workload.graph))
    row.extra["parts_ms"] = times
    row.extra["vs_parts_sum"] = row.latency_ms / sum(times.values())


@measurement("crosscheck", ("extra.crosscheck",))
def crosscheck(trial: Trial) -> None:
    """Where the sweep asks (CUDA, not decode, steps of CROSSCHECK_MIN_MS or more): the same workload timed by
    triton's do_bench, its median ms and our latency's relative difference from it."""
    row, point = trial.row, trial.point
    if not trial.crosscheck or trial.device.type != "cuda" or point.pass_ is Pass.DECODE:
        return
    if row.latency_ms < CROSSCHECK_MIN_MS:
        return
    import triton.testing

    workload = trial.workload
    theirs = triton.testing.do_bench(workload.run, return_mode="median") / workload.layers_per_run
    row.extra["crosscheck"] = {"do_bench_ms": theirs, "rel_diff": row.latency_ms / theirs - 1}


SUMMED = "the parts' medians summed"
ONE_GRAPH = "every part back to back, one CUDA graph"
BACK_TO_BACK = "every part back to back, eagerly"


@measurement("floor", ("floor_ms", "vs_floor", "extra.floor_parts_ms", "extra.floor_method", "extra.floor_ways_ms"),
             addition=True)  # fmt: skip
def floor(trial: Trial) -> None:
    """On a layer- or model-scope point asked for its floor, whose latency was measured: time the point's necessary
    kernels alone (hhbench.bench.floor) and write `floor_ms`, `vs_floor` (latency / floor) and
    `extra.floor_parts_ms` (each part's median alone, per distinct layer, with its count). `floor_ms` is per layer
    like the latency at layer scope, the lower of two timings (`extra.floor_ways_ms` both, `extra.floor_method`
    which): the parts' medians summed, each part as often as the point runs it, and all of them back to back as one
    timed call (one CUDA graph where the point is timed as replays: decode, or [timing] graph = true). A floor is a
    lower bound: how it is timed must not raise it. Alone, each part waits for its own launches: a decode part pays
    a graph launch the step pays once, and a 16K prefill part, eager, waits for its Python to issue it, where the
    step's kernels run while the next are issued (an H200's 16K floors summed read above their layer's latency,
    results/floor-h200-v7); a long prefill part pays none, and there the parts as one graph read 8% above their
    medians summed (results/layer-prefill-graph-h200, head 7:1 at 128K). It tells whether a slowdown is the
    architecture (a high floor) or the implementation (latency far above its floor). It raises what its parts
    raise."""
    point, row, device = trial.point, trial.row, trial.device
    if not (point.floor and point.scope in (Scope.LAYER, Scope.MODEL) and row.status == schema.OK):
        return
    same = trial.policy_of(point.pass_ is Pass.DECODE and device.type == "cuda")
    made = floor_parts(point, device)
    times = time_each({str(i): part.run for i, part in enumerate(made)}, device, same)
    by_layer: dict[str, dict] = {}
    for i, part in enumerate(made):
        entry = by_layer.setdefault(part.layer, {"count": part.count, "parts_ms": {}})
        entry["parts_ms"][part.name] = times[str(i)]
    summed = sum(times[str(i)] * part.count for i, part in enumerate(made))

    def every_part():
        for part in made:
            for _ in range(part.count):
                part.run()

    layers = floor_layers(point)
    ways = {SUMMED: summed / layers, ONE_GRAPH if same.graph else BACK_TO_BACK:
            time_callable(every_part, device, same).median_ms / layers}  # fmt: skip
    method = min(ways, key=ways.get)
    row.floor_ms = ways[method]
    row.vs_floor = row.latency_ms / row.floor_ms
    row.extra["floor_parts_ms"] = by_layer
    row.extra["floor_method"] = method
    row.extra["floor_ways_ms"] = ways


def floor_kernels(point: Point, device: torch.device) -> tuple[dict[str, float], dict[str, set[str]]]:
    """What the point's floor parts launch (hhbench.bench.floor), each profiled alone for one warm call: launches
    per kernel name in the latency's unit (per layer at layer scope, per model call at model scope), and which
    parts launch each name."""
    launches: dict[str, float] = {}
    parts_of: dict[str, set[str]] = {}
    for part in floor_parts(point, device):
        for name, count in profile_kernels(part.run, device, 1, warm=PROFILE_WARM_CALLS).launches.items():
            launches[name] = launches.get(name, 0.0) + count * part.count / floor_layers(point)
            parts_of.setdefault(name, set()).add(part.name)
    return launches, parts_of


PROFILE_SITES = 3  # launch sites kept per listed kernel, the longest first


def _top_sites(found, name: str, per_step: float) -> list[list]:
    """A kernel's PROFILE_SITES longest launch sites (hhbench.measure.profile.launch_site) as [site, ms] in the
    latency's unit."""
    by_site = found.sites.get(name, {})
    ordered = sorted(by_site, key=by_site.__getitem__, reverse=True)[:PROFILE_SITES]
    return [[site, by_site[site] / per_step] for site in ordered]


@measurement("profile", ("extra.kernels", "extra.kernel_shares"), addition=True)
def kernel_profile(trial: Trial) -> None:
    """On a point asked for its profile (`sweep --profile`) whose latency was measured: its step run PROFILE_STEPS
    times under torch.profiler (hhbench.measure.profile; L2 flushed before each call where the timing flushes it),
    after the timing and apart from it. `extra.kernels`: per kernel name (CUDA kernels; CPU operators' self time on
    the CPU) its device time (ms) and launches per step in the latency's unit (per layer at layer scope, per model
    call at model scope) and its longest launch sites in hhbench's source (`sites`: [function, ms]), the PROFILE_TOP
    longest by name and the rest as `other`; `kernel_ms` their sum and
    `step_ms` the profiled calls' own time (both in that unit). A step timed as a CUDA graph (decode) is profiled
    eagerly: the graph replays the very same kernel launches, without the CPU's launch gaps, so the kernels' times
    hold and `step_ms` is above the latency (`note` says so). With two CUDA streams (mode streams) kernels overlap
    and their times may sum above the step's.

    Layer and model scope also get `extra.kernel_shares`: the shares of kernel time in kernels the point's floor
    parts launch (profiled alone; hhbench.measure.profile.kernel_kinds): `floor`, `shared` (names the parts launch
    less often than the step does) and `rest` (names no part launches: norms, gates, merges, copies), and each
    listed kernel its `kind` and the `parts` that launch it. It raises what the step and the parts raise, and
    RuntimeError where the profiler recorded no kernel."""
    point, row, device = trial.point, trial.row, trial.device
    if not (point.profile and row.status == schema.OK):
        return
    workload = trial.workload
    flush = (lambda: L2Flusher.flush(device)) if trial.policy.flush_l2 and device.type == "cuda" else None
    found = profile_kernels(workload.run, device, PROFILE_STEPS, flush, warm=PROFILE_WARM_CALLS)
    per_step = found.steps * workload.layers_per_run
    graph = trial.policy_of(workload.graph).graph
    trial.free()
    if not found.ms:
        raise RuntimeError("the profiler recorded no kernel")
    ms = {name: total / per_step for name, total in found.ms.items()}
    launches = {name: count / per_step for name, count in found.launches.items()}
    kinds, parts_of = {}, {}
    if point.scope in (Scope.LAYER, Scope.MODEL):
        floor_launches, parts_of = floor_kernels(point, device)
        kinds = kernel_kinds(launches, floor_launches)
        total = sum(ms.values())
        row.extra["kernel_shares"] = {
            kind: sum(t for name, t in ms.items() if kinds[name] == kind) / total
            for kind in ("floor", "shared", "rest")
        }
    ordered = sorted(ms, key=ms.__getitem__, reverse=True)
    top = [{"name": name, "ms": ms[name], "launches": launches[name], "sites": _top_sites(found, name, per_step),
            **({"kind": kinds[name], "parts": sorted(parts_of.get(name, ()))} if kinds else {})}
           for name in ordered[:PROFILE_TOP]]  # fmt: skip
    others = ordered[PROFILE_TOP:]
    row.extra["kernels"] = {
        "activity": "cuda" if device.type == "cuda" else "cpu",
        "steps": found.steps,
        "step_ms": found.step_ms / per_step,
        "kernel_ms": sum(ms.values()),
        "top": top,
        "other": {
            "kernels": len(others),
            "ms": sum(ms[n] for n in others),
            "launches": sum(launches[n] for n in others),
        },
        **({"note": "profiled eagerly; timed as a CUDA graph replaying the same kernels"} if graph else {}),
    }
