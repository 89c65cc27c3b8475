"""One point in, one row out: the row of its analytic costs, then each registered measurement in turn
(hhbench.runner.measurements). Every failure becomes the row's status and reason; nothing here raises for a point
that cannot run. A point whose analytic lower bound on memory exceeds what the device has available is not run:
its row says oom (resident_lower_bound)."""

import dataclasses
import os
import traceback

import torch

from hhbench.analytic.flops import tokens
from hhbench.analytic.rows import cost_row
from hhbench.errors import Unsupported
from hhbench.measure.env import device_name
from hhbench.measure.timing import TimingPolicy
from hhbench.plan.grid import Point
from hhbench.rows import schema
from hhbench.rows.schema import Row
from hhbench.runner.measurements import MEASUREMENTS, Trial
from hhbench.spec.axes import Pass, Scope, dtype_bytes
from hhbench.spec.layout import build_plan

GIB = 2**30


def base_row(point: Point) -> Row:
    """The point's row before measurement: its key fields and analytic costs, status analytic."""
    plan = build_plan(point.shape, point.spec)
    row = cost_row(plan, point.pass_, point.context, point.batch, point.scope, point.dtype, point.ratio)
    return dataclasses.replace(row, **point.key_fields())


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


def measure_point(
    point: Point, device: torch.device, policy: TimingPolicy, checked: dict, crosscheck: bool = False
) -> Row:
    """The point's row (Row) measured on `device` under `policy`: the registered measurements in order until one
    decides the status (unavailable, unsupported, incorrect) or all ran (ok); an exception is the row's status and
    reason (oom, unsupported, error). Then, after the workload is freed, the additions (the floor) on what was
    measured, each failure kept in extra["<name>_error"]. `checked` caches correctness across the sweep's points;
    `crosscheck` asks for a do_bench timing too."""
    row = base_row(point)
    row.device = device_name()
    refusal = memory_refusal(point, row, device)
    if refusal:  # measured, it would be killed (the CPU's OOM killer leaves no row) or fail on allocation
        row.status, row.reason = schema.OOM, refusal
        return row
    trial = Trial(point, device, policy, row, checked, crosscheck)
    try:
        for unit in MEASUREMENTS.values():
            if not unit.addition:
                unit.run(trial)
                if row.status != schema.ANALYTIC:
                    break
        else:
            row.status = schema.OK
    except Exception as exc:  # recorded on the row: the sweep goes on
        row.status, row.reason = _classify(exc)
    finally:
        trial.free()
    for unit in MEASUREMENTS.values():
        if unit.addition:
            try:
                unit.run(trial)
            except Exception as exc:  # an addition's failure is kept, the row keeps its latency
                row.extra[f"{unit.name}_error"] = _classify(exc)[1]
            finally:
                trial.free()
    return row
