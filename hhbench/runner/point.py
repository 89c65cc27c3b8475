"""One point in, one row out: availability, correctness against the reference, then timing and memory.
Every failure becomes the row's status and reason; nothing here raises for a point that cannot run."""

import dataclasses
import gc
import math
import traceback

import torch

from hhbench.analytic.rows import cost_row
from hhbench.bench import workloads
from hhbench.errors import Unsupported
from hhbench.kernels import registry
from hhbench.measure.env import device_name
from hhbench.measure.timing import TimingPolicy, peak_memory_bytes, time_callable, time_each
from hhbench.plan.grid import Point
from hhbench.rows import schema
from hhbench.rows.schema import Row
from hhbench.runner import floor
from hhbench.spec.axes import Pass
from hhbench.spec.layout import build_plan

CHECK_CONTEXT = 256  # small enough for the token-by-token oracle, several GDN chunks long
TOLERANCE = {"bf16": 5e-2, "fp16": 2e-2, "fp32": 5e-3}  # max relative error, outputs and gradients
REFERENCE = {registry.FA: "sdpa-math", registry.GDN: "torch-recurrent"}
# Crosscheck only steps at least this long: shorter ones are launch- and CPU-bound, and two timers then
# disagree by their jitter rather than by their method.
CROSSCHECK_MIN_MS = 2.0


def base_row(point: Point) -> Row:
    plan = build_plan(point.shape, point.spec)
    row = cost_row(plan, point.pass_, point.context, point.batch, point.scope, point.dtype, point.ratio)
    return dataclasses.replace(row, **point.key_fields())


def relative_error(test: torch.Tensor, ref: torch.Tensor) -> float:
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


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _classify(exc: BaseException) -> tuple[str, str]:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return schema.OOM, message
    if isinstance(exc, Unsupported | NotImplementedError):
        return schema.UNSUPPORTED, message
    # fla refuses, with an explanation, what it knows it computes wrongly (GDN backward on Hopper, Triton < 3.7.1)
    if isinstance(exc, RuntimeError) and "Triton" in message and "incorrect" in message:
        return schema.UNSUPPORTED, " ".join(str(exc).split())
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else ""
    return schema.ERROR, f"{type(exc).__name__}: {message}{where}"


def _needed_backends(point: Point):
    plan = build_plan(point.shape, point.spec)
    needed = []
    if plan.fa_heads:
        needed.append(registry.get(point.fa_backend, registry.FA))
    if plan.la_heads:
        needed.append(registry.get(point.gdn_backend, registry.GDN))
    return needed


def _implementation(backends, pass_: str) -> str:
    """What the GDN backend says it runs for this pass, "" where the point has no GDN head."""
    return next((b.implementation(pass_) for b in backends if b.kind == registry.GDN), "")


def measure_point(
    point: Point, device: torch.device, policy: TimingPolicy, checked: dict, crosscheck: bool = False
) -> Row:
    row = base_row(point)
    row.device = device_name()
    backends = _needed_backends(point)
    for backend in backends:
        reason = backend.unavailable(device.type)
        if reason:
            row.status, row.reason = schema.UNAVAILABLE, f"{backend.name}: {reason}"
            return row
        reason = backend.unsupported(point.pass_.value, point.dtype, point.shape.head_dim)
        if reason:
            row.status, row.reason = schema.UNSUPPORTED, reason
            return row
    row.gdn_impl = _implementation(backends, point.pass_.value)
    try:
        check_key = (
            point.shape,
            point.spec,
            point.pass_,
            point.scope,
            point.dtype,
            point.fa_backend,
            point.gdn_backend,
            point.mode,
        )
        if check_key not in checked:
            checked[check_key] = check_correctness(point, device)
            _free(device)
        row.max_rel_err = checked[check_key]
        if not row.max_rel_err <= TOLERANCE[point.dtype]:
            row.status = schema.INCORRECT
            row.reason = (
                f"relative error {row.max_rel_err:.3g} against the fp32 reference exceeds {TOLERANCE[point.dtype]}"
            )
            return row
        workload = workloads.build(point, device)
        timing = time_callable(workload.run, device, TimingPolicy(**{**policy.__dict__, "graph": workload.graph}))
        per_layer = workload.layers_per_run
        row.samples_ms = [s / per_layer for s in timing.samples_ms]
        row.latency_ms = timing.median_ms / per_layer
        row.latency_p10_ms = timing.percentile(0.1) / per_layer
        row.latency_p90_ms = timing.percentile(0.9) / per_layer
        row.reps, row.timer, row.compile_ms = len(timing.samples_ms), timing.timer, timing.compile_ms
        row.peak_mem_bytes = peak_memory_bytes(workload.run, device)
        if row.peak_mem_bytes is None:
            row.extra["peak_mem"] = "not measured on the CPU (analytic memory only)"
        seconds = row.latency_ms * 1e-3
        row.tflops = row.flops_total / seconds / 1e12
        row.gbps = row.bytes_moved / seconds / 1e9
        if per_layer > 1:
            row.extra["unit_layers"] = per_layer
        if timing.notes:
            row.extra["timing_notes"] = timing.notes
        if workload.parts:
            same = TimingPolicy(**{**policy.__dict__, "graph": workload.graph})
            parts = time_each(workload.parts, device, same)
            row.extra["parts_ms"] = parts
            row.extra["vs_parts_sum"] = row.latency_ms / sum(parts.values())
        if (
            crosscheck
            and device.type == "cuda"
            and point.pass_ is not Pass.DECODE
            and row.latency_ms >= CROSSCHECK_MIN_MS
        ):
            import triton.testing

            theirs = triton.testing.do_bench(workload.run, return_mode="median") / per_layer
            row.extra["crosscheck"] = {"do_bench_ms": theirs, "rel_diff": row.latency_ms / theirs - 1}
        row.status = schema.OK
    except Exception as exc:  # recorded on the row: the sweep goes on
        row.status, row.reason = _classify(exc)
    finally:
        workload = None
        _free(device)
    try:  # after the point's own workload is freed
        floor.measure(point, device, policy, row)
    except Exception as exc:  # the floor is an addition: its failure is kept, the row keeps its latency
        row.extra["floor_error"] = _classify(exc)[1]
    finally:
        _free(device)
    return row
