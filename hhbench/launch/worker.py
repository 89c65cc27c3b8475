"""One worker: a shard of the plan measured in this process by the single-process sweep, its rows in its own
shard file. `python -m hhbench.launch.worker TASK.pkl` is the worker process of `sweep --gpus` and of each submitit job
(cluster.shard_job), started by local.WorkerProcess with faulthandler on."""

import datetime
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from hhbench.errors import UserError
from hhbench.files import replace_whole
from hhbench.launch.lock import try_lock
from hhbench.measure.timing import TimingPolicy
from hhbench.plan.grid import Point
from hhbench.rows.runs import RunDir
from hhbench.runner.sweep import SweepResult, run_sweep


@dataclass(frozen=True)
class Task:
    """What one worker measures, picklable (a worker process, a submitit job)."""

    run: str  # the run folder
    name: str  # the worker: its shard files' name and its rows' `worker`
    points: tuple[Point, ...]
    policy: TimingPolicy
    suite: str
    device: str  # cpu or cuda: with CUDA, the one GPU that CUDA_VISIBLE_DEVICES leaves this process
    isolate: bool = False
    threads: int = 0  # torch's CPU threads on the CPU (0: torch's default)


def run_task(task: Task) -> SweepResult:
    """Measure the task's points that have no row yet, stopping early where an error left the CUDA context
    unusable (result.poisoned). Raises UserError while another worker holds this shard, or where the run was
    measured on another device."""
    run = RunDir(Path(task.run))
    files = run.shard(task.name)
    handle = try_lock(files.rows)
    if handle is None:
        raise UserError(f"worker {task.name} of run {run.path} is running elsewhere: not started twice")
    try:
        if task.threads and task.device == "cpu":
            torch.set_num_threads(task.threads)
        result = run_sweep(list(task.points), run, torch.device(task.device), task.policy, task.suite,
                           task.isolate, worker=task.name)  # fmt: skip
        files.current.unlink(missing_ok=True)  # stopped between points: nothing in progress to reap
        env = json.loads(files.env.read_text())  # when it finished: the workers of a run should finish together
        env["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        with replace_whole(files.env) as out:  # a worker killed here leaves the env it had: merge reads it
            json.dump(env, out, indent=2, sort_keys=True)
    finally:
        handle.close()
    return result


def die_with_supervisor() -> None:
    """Linux: this process is killed when the process that started it dies (PR_SET_PDEATHSIG), so that no worker
    outlives its launch (a killed sweep, a cancelled job) and goes on writing its shard unwatched."""
    if sys.platform != "linux":
        return
    import ctypes
    import os
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != int(os.environ.get("HHBENCH_SUPERVISOR", os.getppid())):  # it died before the call
        raise SystemExit(1)


if __name__ == "__main__":
    die_with_supervisor()
    with open(sys.argv[1], "rb") as stream:
        loaded = pickle.load(stream)
    try:
        outcome = run_task(loaded)
    except UserError as exc:
        print(f"hhbench: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if outcome.poisoned:  # the supervisor starts a fresh process on the points left
        print(f"hhbench: CUDA context unusable after {outcome.poisoned}", file=sys.stderr)
        raise SystemExit(3)
