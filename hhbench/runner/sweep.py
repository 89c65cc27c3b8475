"""The sweep loop: points in, rows appended to results/<run>/rows.jsonl as each finishes.

A finished row is durable before the next point starts (append + fsync); a rerun into the same run skips the
points that already have a row (by Point.identity: 3:1 asked after 6:2 is the same point), so a killed sweep
resumes where it stopped, without duplicates. With `isolate`, each point runs in a fresh subprocess, because a
CUDA error poisons the process that hit it.

The same loop runs in each worker of a launch (hhbench.launch): with `worker`, rows go to the worker's shard file
and its env beside it, rows.jsonl and env.json are only read, and each point's error row is written down before
the point starts, so that a worker that dies on it leaves that row (hhbench.launch.merge).
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hhbench.errors import UserError
from hhbench.files import replace_whole
from hhbench.kernels import registry
from hhbench.measure.env import capture_env, device_name, measure_peaks
from hhbench.measure.timing import TimingPolicy
from hhbench.plan.grid import Point
from hhbench.rows import schema
from hhbench.rows.runs import RunDir
from hhbench.rows.schema import Row, RowSet, append_row, read_rows
from hhbench.runner.measurements import heap_frozen
from hhbench.runner.point import base_row, complete_row, measure_point

RETRYABLE = (schema.ERROR, schema.OOM)
POINT = "point"  # measure_again: the whole point, not some of its additions


@dataclass
class SweepResult:
    """What a sweep did: the run, all its rows (old and new), how many points were measured, completed and skipped,
    and the do_bench crosschecks made and failed."""

    run: RunDir
    rows: RowSet  # every row of the run, old and new
    new: int = 0
    skipped: int = 0
    completed: int = 0  # finished rows whose profile or floor was measured again (complete_rows)
    crosscheck_failures: list[str] = field(default_factory=list)
    crosschecked: int = 0  # points timed again with do_bench (kernel scope, not decode, at least 2 ms)
    poisoned: str = ""  # a worker's CUDA context failed after this error: the rest of its points left to another


def asked_extras(points: list[Point]) -> dict[tuple, dict[str, str | None]]:
    """Per point identity, the measurements its row must hold to count as finished, each by name with the extra key
    that shows it: parts (parts_ms) where the point asks for its parts, the additions profile (kernels) where it asks
    for its profile and floor where it asks for its floor. The floor's key is None: only a floor that failed is
    measured again, a row without one (measured before the floor existed, or with --no-floor) is left as it is."""
    asked: dict[tuple, dict[str, str | None]] = {}
    for point in points:
        wants = {name: key for name, key, asks in (("parts", "parts_ms", point.parts),
                 ("profile", "kernels", point.profile), ("floor", None, point.floor)) if asks}  # fmt: skip
        if wants:
            asked[point.identity] = wants
    return asked


def measure_again(row: Row, retry: bool, asked: dict[tuple, dict[str, str | None]]) -> tuple[str, ...]:
    """What of the row's point a sweep measures again (the one rule of resuming): (POINT,), all of it, for an error or
    oom row with `retry` and an ok row without the parts it asks for; else the additions it asks for that the ok row
    lacks (a profile), and with `retry` those that failed on it (extra["<name>_error"]: profile, floor), measured
    again on the row, which keeps its latency (hhbench.runner.point.complete_row); () for nothing. `asked`:
    asked_extras."""
    if retry and row.status in RETRYABLE:
        return (POINT,)
    if row.status != schema.OK:
        return ()
    missing = tuple(name for name, key in asked.get(row.key, {}).items()
                    if (retry if f"{name}_error" in row.extra else key is not None and key not in row.extra))  # fmt: skip
    return (POINT,) if "parts" in missing else missing


def finished_rows(run: RunDir, retry: bool, asked: dict[tuple, dict[str, str | None]]) -> RowSet:
    """The run's rows, less those whose point is measured again whole (measure_again; rows.jsonl rewritten
    atomically). Rows that only some additions are measured again on stay: complete_rows rewrites them."""
    if not run.rows_path.exists():
        return RowSet()
    rows = read_rows(run.rows_path, repair=True)
    kept = RowSet(row for row in rows if measure_again(row, retry, asked) != (POINT,))
    if len(kept) < len(rows):
        kept.to_jsonl(run.rows_path)
    return kept


def complete_rows(
    points: list[Point],
    run: RunDir,
    rows: RowSet,
    device: torch.device,
    policy: TimingPolicy,
    retry: bool,
    isolate: bool = False,
    on_row: Callable[[Row, int, int], None] | None = None,
) -> int:
    """Measure again, on the finished rows (`rows`, those of finished_rows) of `points`, the additions that
    measure_again names, each completed row replacing its old one in `rows` and in rows.jsonl as it finishes (the old
    row stays until then: a run never loses a finished row). Returns how many rows were completed."""
    asked = asked_extras(points)
    by_key = {point.identity: point for point in points}
    where = {row.key: index for index, row in enumerate(rows) if row.key in by_key}
    todo = [(where[key], names) for key in where if (names := measure_again(rows[where[key]], retry, asked))]
    for done, (index, names) in enumerate(todo, 1):
        point, old = by_key[rows[index].key], rows[index]
        rows[index] = _measure_isolated(point, device, policy, False, (old, names)) if isolate else (
            complete_row(point, device, policy, old, names))  # fmt: skip
        rows.to_jsonl(run.rows_path)
        if on_row:
            on_row(rows[index], done, len(todo))
    return len(todo)


def _check_device(env: dict, run: RunDir) -> None:
    here = device_name()
    if env and env.get("device") != here:
        raise UserError(
            f"run {run.path} was measured on {env.get('device')}, this machine is {here}: use another --run"
        )


def _new_env(suite_name: str, device: torch.device, extra: dict) -> dict:
    # auto's candidates available here, in order: a point's auto takes the first that accepts it
    env = capture_env({"suite": suite_name, "auto": registry.auto_choices(device.type), **extra})
    if device.type == "cuda":
        env["peaks"] = measure_peaks()
    return env


def check_timer(run: RunDir, policy: TimingPolicy) -> None:
    """Refuses (UserError) a sweep into a run whose prefill or training rows were timed on CUDA the other way: as
    CUDA-graph replays where `policy` times them eagerly, or the reverse. The row key does not hold the timer, so
    resuming the one run with the other policy would skip its points as measured, or mix the two in one table."""
    asked = "cuda-graph" if policy.graph else "cuda-events"
    other = {row.timer for row in run.rows() if row.pass_ != "decode" and row.timer in ("cuda-graph", "cuda-events")}
    if other - {asked}:
        held, wanted = ("eagerly", "as CUDA graphs") if policy.graph else ("as CUDA graphs", "eagerly")
        raise UserError(f"run {run.path} timed its prefill and training steps {held}, this sweep times them {wanted}: "
                        "use another --run")  # fmt: skip


def prepare_env(run: RunDir, suite_name: str, device: torch.device, workers: int = 1) -> None:
    """env.json of a run measured here: written at its first sweep (its `argv` is the first sweep's), a session
    added at each with its time, commit, command line (`argv`) and number of worker processes (`worker_count`: 1 inline,
    the GPUs of --gpus, the shards of --launcher local); a run measured on another device is refused. Sessions of
    env.json files written before argv and worker_count were recorded lack those two keys."""
    env = run.env()
    _check_device(env, run)
    if not env:
        env = _new_env(suite_name, device, {"argv": sys.argv[1:]})
    now = capture_env()
    session = {
        "time": now["time"],
        "hhbench_commit": now["hhbench_commit"],
        "argv": sys.argv[1:],
        "worker_count": workers,
    }
    env.setdefault("sessions", []).append(session)
    run.write_env(env)


def _prepare_worker_env(run: RunDir, worker: str, suite_name: str, device: torch.device) -> None:
    """The worker's own env (host, device, the GPU it was given) beside its rows; merge folds it into env.json."""
    env = run.env()
    if env.get("device"):
        _check_device(env, run)
    where = {"worker": worker, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
             "slurm_job_id": os.environ.get("SLURM_JOB_ID")}  # fmt: skip
    mine = _new_env(suite_name, device, where)
    with replace_whole(run.shard(worker).env) as out:  # a worker killed while writing it leaves none: merge reads it
        json.dump(mine, out, indent=2, sort_keys=True)


# extra's key of a noted row whose point was measured and whose addition of that name was running (merge.reap)
ADDITION_RUNNING = "addition_running"


def _note_current(run: RunDir, worker: str, point: Point) -> None:
    """The point's row as it stays if this worker dies measuring it (merge.reap fills in why); replaced whole."""
    row = base_row(point)
    row.status, row.device, row.worker = schema.ERROR, device_name(), worker
    _write_current(run, worker, row)


def noted_addition(row: Row, name: str) -> Row:
    """A copy of the measured `row` as it stays if its process dies inside its addition `name` (the floor, the
    profile): its latency kept, the addition failed (addition_failed), so that --retry-errors measures it again."""
    noted = Row.from_dict(row.to_dict())
    noted.extra[ADDITION_RUNNING] = name
    return noted


def addition_failed(row: Row, why: str) -> bool:
    """Whether `row`, as noted before its process died, was noted inside an addition (noted_addition): then that
    addition failed with `why` (extra["<name>_error"]); else the row was noted before its point was measured."""
    name = row.extra.pop(ADDITION_RUNNING, None)
    if name:
        row.extra[f"{name}_error"] = why
    return bool(name)


def noting_asked(point: Point, note: Callable[[Row, str], None]) -> Callable[[Row, str], None]:
    """measure_point's on_addition: `note(row, name)` before each addition `point` asks for (asked_extras), none
    before those it skips (a death there would fail an addition the point never asked for)."""
    wants = asked_extras([point]).get(point.identity, {})
    return lambda row, name: note(row, name) if name in wants else None


def _note_addition(run: RunDir, worker: str, row: Row, name: str) -> None:
    """The measured row as it stays if this worker dies inside its addition `name` (merge.reap)."""
    noted = noted_addition(row, name)
    noted.worker = worker
    _write_current(run, worker, noted)


def _write_current(run: RunDir, worker: str, row: Row) -> None:
    """Write `row` as the worker's point in progress (ShardFiles.current), replacing the last one whole."""
    with replace_whole(run.shard(worker).current) as out:
        json.dump(row.to_dict(), out)


def device_usable(device: torch.device) -> bool:
    """Whether the device still runs work after an error: an illegal memory access leaves a CUDA context that
    fails every later call (sticky), so that every later point in the process would be an error row."""
    if device.type != "cuda":
        return True
    try:
        torch.ones(1, device=device).add_(1)
        torch.cuda.synchronize()
    except RuntimeError:
        return False
    return True


def _measure_isolated(
    point: Point,
    device: torch.device,
    policy: TimingPolicy,
    crosscheck: bool,
    completing: tuple[Row, tuple[str, ...]] | None = None,
) -> Row:
    """The point measured in a fresh process (hhbench.runner.worker) with this process's torch CPU threads
    (`--threads`: a fresh process would take torch's default); with `completing` (a finished row and the additions
    to measure again on it, complete_row) only those. A process that fails leaves an error row, or the finished row
    with the failure as each addition's error; one that dies inside an addition of the point (it prints the row
    before each: noted_addition) leaves that row, the addition failed."""
    old = (completing[0].to_dict(), completing[1]) if completing else None
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as handle:
        pickle.dump((point, device.type, policy, crosscheck, old, torch.get_num_threads()), handle)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "hhbench.runner.worker", handle.name], capture_output=True, text=True
        )
    finally:
        os.unlink(handle.name)
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0 and lines:
        return Row.from_dict(json.loads(lines[-1]))
    code, tail = result.returncode, " | ".join(result.stderr.strip().splitlines()[-3:])
    # a crash is named by its signal (-11 says SIGSEGV to few), and often leaves no stderr to quote
    ended = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
    why = f"isolated worker {ended}" + (f": {tail}" if tail else "")
    if completing:
        row = Row.from_dict(completing[0].to_dict())
        row.extra.update({f"{name}_error": why for name in completing[1]})
        return row
    noted = [line for line in lines if line.startswith("{")]  # the rows it printed before each addition
    if noted:  # it died inside an addition of the point it had measured
        row = Row.from_dict(json.loads(noted[-1]))
        if addition_failed(row, why):
            return row
    row = base_row(point)
    row.status, row.reason = schema.ERROR, why
    row.device = device_name()
    return row


@heap_frozen()
def run_sweep(
    points: list[Point],
    run: RunDir,
    device: torch.device,
    policy: TimingPolicy,
    suite_name: str = "",
    isolate: bool = False,
    crosscheck: int = 0,
    retry: bool = False,
    on_row: Callable[[Row, int, int], None] | None = None,
    worker: str = "",
) -> SweepResult:
    """Measure the points that `run` has no row for yet (`retry`: error and oom rows again, and failed profiles and
    floors: measure_again; complete_rows first measures what finished rows lack), appending each row
    durably as it finishes; `isolate` runs each point in a subprocess; `crosscheck` times up to that many kernel
    points again with triton's do_bench (a gap over 5% is a failure). Raises UserError when the run was measured
    on another device."""
    run.create()
    if worker:  # the launcher prepared env.json and rows.jsonl (retry, parts); this worker only reads them
        out = run.shard(worker).rows
        _prepare_worker_env(run, worker, suite_name, device)
        rows = RowSet([*run.rows(), *(read_rows(out, repair=True) if out.exists() else [])])
    else:
        out = run.rows_path
        prepare_env(run, suite_name, device)
        rows = finished_rows(run, retry, asked_extras(points))
    completed = 0 if worker else complete_rows(points, run, rows, device, policy, retry, isolate, on_row)
    done = {row.key for row in rows}
    todo = [p for p in points if p.identity not in done]
    result = SweepResult(run, rows, skipped=len(points) - len(todo) - completed, completed=completed)
    checked: dict = {}
    crosschecks_left = crosscheck
    for index, point in enumerate(todo):
        wants_crosscheck = crosschecks_left > 0 and point.scope.value == "kernel" and point.pass_.value != "decode"
        if worker:
            _note_current(run, worker, point)
        began = time.perf_counter()
        if isolate:
            row = _measure_isolated(point, device, policy, wants_crosscheck)
        else:
            noting = noting_asked(point, lambda measured, name: _note_addition(run, worker, measured, name))
            row = measure_point(point, device, policy, checked, wants_crosscheck, noting if worker else None)
        # the point's wall time, compiles, autotuning, the correctness check and the floor included: what a
        # suite costs to run, point by point
        row.extra["point_s"] = round(time.perf_counter() - began, 2)
        row.run, row.worker = run.name, worker
        append_row(out, row)
        rows.append(row)
        result.new += 1
        check = row.extra.get("crosscheck")
        if check:
            crosschecks_left -= 1
            result.crosschecked += 1
            if abs(check["rel_diff"]) > 0.05:
                result.crosscheck_failures.append(
                    f"{row.variant} {row.pass_} {row.context}: hhbench {row.latency_ms:.4g} ms vs do_bench {check['do_bench_ms']:.4g} ms"
                )
        if on_row:
            on_row(row, index + 1, len(todo))
        if worker and row.status == schema.ERROR and not device_usable(device):
            result.poisoned = f"{row.variant} {row.pass_} {row.scope} {row.context}: {row.reason}"
            break
    return result
