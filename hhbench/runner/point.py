"""One point in, one row out: the row of its analytic costs, then each registered measurement in turn
(hhbench.runner.measurements). Every failure becomes the row's status and reason; nothing here raises for a point
that cannot run."""

import dataclasses
import traceback
from collections.abc import Callable

import torch

from hhbench.analytic.rows import cost_row
from hhbench.errors import Unsupported
from hhbench.measure.env import device_name
from hhbench.measure.timing import TimingPolicy
from hhbench.plan.grid import Point
from hhbench.rows import schema
from hhbench.rows.schema import Row
from hhbench.runner.measurements import MEASUREMENTS, Trial
from hhbench.spec.layout import build_plan


def base_row(point: Point) -> Row:
    """The point's row before measurement: its key fields and analytic costs, status analytic."""
    plan = build_plan(point.shape, point.spec)
    row = cost_row(plan, point.pass_, point.context, point.batch, point.scope, point.dtype, point.ratio)
    return dataclasses.replace(row, **point.key_fields())


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
    point: Point,
    device: torch.device,
    policy: TimingPolicy,
    checked: dict,
    crosscheck: bool = False,
    on_addition: Callable[[Row, str], None] | None = None,
) -> Row:
    """The point's row (Row) measured on `device` under `policy`: the registered measurements in order until one
    decides the status (unavailable, unsupported, incorrect) or all ran (ok); an exception is the row's status and
    reason (oom, unsupported, error). Then, after the workload is freed, the additions (the floor) on what was
    measured, each failure kept in extra["<name>_error"]; `on_addition(row, name)` is told before each addition of
    an ok row (a worker notes the row, so that a crash inside an addition costs only that addition). `checked`
    caches correctness across the sweep's points; `crosscheck` asks for a do_bench timing too."""
    row = base_row(point)
    row.device = device_name()
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
    _run_additions(trial, [name for name, unit in MEASUREMENTS.items() if unit.addition], on_addition)
    return row


def _run_additions(trial: Trial, names: list[str], on_addition: Callable[[Row, str], None] | None = None) -> None:
    for name in names:
        if on_addition is not None and trial.row.status == schema.OK:
            on_addition(trial.row, name)
        try:
            MEASUREMENTS[name].run(trial)
        except Exception as exc:  # an addition's failure is kept, the row keeps its latency
            trial.row.extra[f"{name}_error"] = _classify(exc)[1]
        finally:
            trial.free()


def complete_row(point: Point, device: torch.device, policy: TimingPolicy, row: Row, names: tuple[str, ...]) -> Row:
    """A copy of `row`, a finished ok row of `point`, with its additions `names` (profile, floor: units of
    hhbench.runner.measurements) measured again on `device` under `policy`: their old error (extra["<name>_error"])
    dropped and their fields rewritten, every other field kept (the latency stays the one measured with the row). A
    failure is kept in extra["<name>_error"] again, as in measure_point."""
    row = Row.from_dict(row.to_dict())
    for name in names:
        row.extra.pop(f"{name}_error", None)
    trial = Trial(point, device, policy, row, {})
    _run_additions(trial, list(names))
    return row
