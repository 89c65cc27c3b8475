"""submitit, the field's convention for clusters: the shards as one SLURM job array (one shard a task), or as
jobs of its local executor on a machine without SLURM. Each job measures its shard on the GPUs it was given,
one worker process per GPU (hhbench.launch.local), so that a point that kills its worker costs that point only."""

import contextlib
import faulthandler
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hhbench.errors import UserError, require_extra
from hhbench.launch.local import POLL_S, crash_site, rows_written, run_on_gpus, sigterm_raises, visible_gpus
from hhbench.launch.lock import try_lock
from hhbench.launch.worker import Task
from hhbench.rows.runs import RunDir

SUBMITIT = "submitit"  # the folder in RUN/ holding submitit's pickles and logs
CONTROLLER_LOG = "controllers.log"  # in SUBMITIT: what submitit's local job controllers print
CANCEL_WAIT_S = 10
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local executor kills a job after 2 minutes unless told otherwise
# SLURM's --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds
TIME = re.compile(r"(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+):(\d+):(\d+)|(\d+)(?::(\d+))?)")
# SLURM job states in which a shard's task may still write: its shard is not submitted again
QUEUED = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")
NAME = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")  # a SLURM partition or account (a list for partitions)


def parse_time(text: str) -> int:
    """A SLURM --time value in whole minutes, rounded up. Raises UserError for another format or zero."""
    match = TIME.fullmatch(text.strip())
    if not match:
        raise UserError(
            f"--slurm-time {text!r}: use SLURM's formats, minutes, minutes:seconds, hours:minutes:seconds or "
            "days-hours[:minutes[:seconds]]"
        )
    days, day_hours, day_minutes, day_seconds, hours, minutes, seconds, only_minutes, only_seconds = (
        int(group or 0) for group in match.groups()
    )
    total_s = (
        days * 86400 + day_hours * 3600 + day_minutes * 60 + day_seconds
        + hours * 3600 + minutes * 60 + seconds + only_minutes * 60 + only_seconds
    )  # fmt: skip
    if not total_s:
        raise UserError(f"--slurm-time {text!r} is zero: give the time a shard may run")
    return -(-total_s // 60)


def import_submitit():
    """submitit, imported where a launcher (local or slurm) needs it: the `cluster` extra, through
    errors.require_extra (UserError naming `pip install 'hhbench[cluster]'` where it is not installed)."""
    return require_extra("submitit", "cluster")


@dataclass(frozen=True)
class Slurm:
    """What each array task asks of SLURM: one node, one task, `gpus_per_node` GPUs, `minutes` of time."""

    partition: str = ""
    gpus_per_node: int = 1
    minutes: int = 60
    account: str = ""

    def __post_init__(self):
        for flag, value in (("--slurm-partition", self.partition), ("--slurm-account", self.account)):
            if value and not NAME.fullmatch(value):
                raise UserError(f"{flag} {value!r}: a SLURM name is letters, digits, '_', '-' and '.'")
        if self.gpus_per_node < 0:
            raise UserError(f"--slurm-gpus-per-node must be >= 0, got {self.gpus_per_node}")

    def parameters(self) -> dict:
        """SlurmExecutor.update_parameters' arguments."""
        chosen = {"partition": self.partition or None, "account": self.account or None}
        return {"job_name": "hhbench", "nodes": 1, "ntasks_per_node": 1, "time": self.minutes,
                "gpus_per_node": self.gpus_per_node, **{k: v for k, v in chosen.items() if v}}  # fmt: skip


def shard_job(task: Task) -> int:
    """One job (an array task, a local job): its shard over the GPUs the job was given, one worker each, or one
    worker on the CPU. Raises RuntimeError, so that the job reads as failed, when a worker stopped between
    points; returns the number of points. A crash of the job's own process (a driver's, as CUDA starts) leaves its
    stack in submitit's log of the job (job_failure). A task on the CPU (--device cpu on a GPU machine, a node
    without GPUs) runs one worker on the CPU, named after its shard alone."""
    faulthandler.enable()
    failures = run_on_gpus(task, (visible_gpus() if task.device == "cuda" else []) or [None])
    if failures:
        raise RuntimeError("; ".join(failures))
    return len(task.points)


def check_submission() -> None:
    """Refuse a SLURM submission from a machine without srun (not a SLURM login node): UserError, raised before
    the sweep writes anything (submitit's own check would come after the run folder and its lock exist)."""
    if import_submitit().SlurmExecutor.affinity() < 0:  # submitit's probe: -1 where srun is not on PATH
        raise UserError("--launcher slurm: srun is not on PATH (submit from a SLURM login node, or use --dry-run)")


def _slurm_executor(submitit, folder: Path, slurm: Slurm, script_only: bool):
    kind = submitit.SlurmExecutor
    if script_only:  # SlurmExecutor refuses to exist where srun is missing; its script needs no srun

        class ScriptOnly(kind):
            @classmethod
            def affinity(cls) -> int:
                return 1

        kind = ScriptOnly
    else:
        check_submission()
    executor = kind(folder=folder)
    executor.update_parameters(**slurm.parameters())
    return executor


def sbatch_script(run: RunDir, slurm: Slurm, count: int) -> str:
    """The sbatch script that submitting `count` shards writes, as submitit writes it (SlurmExecutor's
    submission text, with the --array line it adds for more than one job)."""
    executor = _slurm_executor(import_submitit(), run.path / SUBMITIT, slurm, script_only=True)
    if count > 1:
        executor.parameters["map_count"] = count  # what SlurmExecutor does when it submits an array
    return executor._make_submission_file_text(executor._submitit_command_str, uid="")


def _record(run: RunDir) -> Path:
    return run.path / SUBMITIT / "array.json"  # shard name -> the SLURM job id of its last submission


def submit_slurm(run: RunDir, tasks: list[Task], slurm: Slurm) -> list[str]:
    """The tasks submitted as one job array; returns the job ids (ARRAY_TASK), also recorded for queued_shards."""
    executor = _slurm_executor(import_submitit(), run.path / SUBMITIT, slurm, script_only=False)
    with executor.batch():
        jobs = [executor.submit(shard_job, task) for task in tasks]
    ids = [job.job_id for job in jobs]
    record = _record(run)
    known = json.loads(record.read_text()) if record.exists() else {}
    record.write_text(json.dumps({**known, **{task.name: id_ for task, id_ in zip(tasks, ids, strict=True)}}))
    return ids


def job_states(run: RunDir, ids: list[str]) -> dict[str, str]:
    """SLURM's state of each job id (one sacct call through submitit's watcher; UNKNOWN where sacct cannot say)."""
    submitit = import_submitit()
    jobs = [submitit.SlurmJob(folder=run.path / SUBMITIT, job_id=id_) for id_ in ids]
    if jobs:
        jobs[0].watcher.update()
    return {job.job_id: job.watcher.get_state(job.job_id, mode="cache") for job in jobs}


def queued_shards(run: RunDir) -> list[str]:
    """The shards whose last submitted task SLURM still holds (pending or running): a rerun leaves them be."""
    record = _record(run)
    if not record.exists():
        return []
    submitted = json.loads(record.read_text())
    states = job_states(run, list(submitted.values()))
    return [name for name, id_ in submitted.items() if states.get(id_, "").split(" ")[0].upper() in QUEUED]


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """This process's stderr (file descriptor 2) appended to `path` while inside: the processes started here
    inherit it. submitit's local controllers print a KeyboardInterrupt traceback to the stderr they inherit when
    a Ctrl-C (SIGINT to the terminal's process group) or a cancel reaches them: the log gets it, not the terminal,
    where the sweep's own line says it was interrupted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _shards_released(run: RunDir, names: list[str]) -> bool:
    """Whether no process holds the shards `names` that exist (each one's lock taken and let go at once), as the
    merge needs."""
    for name in names:
        if not run.shard(name).rows.exists():  # never started (try_lock would make the file)
            continue
        handle = try_lock(run.shard(name).rows)
        if handle is None:
            return False
        handle.close()
    return True


def run_local(
    run: RunDir, tasks: list[Task], gpus: list[str], on_progress: Callable[[int, int], None] | None = None
) -> list[str]:
    """The tasks as jobs of submitit's local executor, job i on GPU gpus[i % len(gpus)] (on the CPU without
    GPUs), waited for; returns one line per failed job. Interrupted (KeyboardInterrupt, or Terminated for a SIGTERM),
    it cancels its jobs and waits for them to end (CANCEL_WAIT_S at most) before the exception goes on."""
    submitit = import_submitit()
    if not all(gpu.isdigit() for gpu in gpus):
        raise UserError(f"--launcher local gives jobs GPUs by index, and CUDA_VISIBLE_DEVICES names {','.join(gpus)}")
    executor = submitit.LocalExecutor(folder=run.path / SUBMITIT)
    names, total = [task.name for task in tasks], sum(len(task.points) for task in tasks)
    before = rows_written(run, names)
    jobs = []
    with sigterm_raises():
        try:
            with _stderr_to(run.path / SUBMITIT / CONTROLLER_LOG):
                for index, task in enumerate(tasks):
                    gpu = [int(gpus[index % len(gpus)])] if gpus else []
                    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, gpus_per_node=len(gpu), visible_gpus=gpu)
                    jobs.append((task, executor.submit(shard_job, task)))
            while not all(job.done() for _, job in jobs):
                time.sleep(POLL_S)
                if on_progress:
                    on_progress(rows_written(run, names) - before, total)
        finally:  # interrupted: no job outlives its launch (submitit's controller ends the job's processes)
            for _, job in jobs:
                if not job.done():
                    job.cancel(check=False)
            # so that the merge after this finds their shards released: the jobs ended, and then no worker holding a
            # shard (a controller can end, its job reported done, a moment before that worker has died)
            deadline = time.monotonic() + CANCEL_WAIT_S
            while time.monotonic() < deadline and not (
                all(job.done() for _, job in jobs) and _shards_released(run, names)
            ):
                time.sleep(POLL_S)
    return [f"job {task.name}: {why}" for task, job in jobs if (why := job_failure(job)) is not None]


def job_failure(job) -> str | None:
    """Why a submitit job failed, one line (None when it did not): where its process crashed (crash_site of its
    stderr log: submitit says only that a job killed by a signal 'has not produced any output'), else submitit's line
    saying so for a job that ended without a result (a SIGKILL leaves no dump; the job's log lines follow it in
    submitit's error), else the last line of submitit's error (the job's exception)."""
    error = job.exception()
    if error is None:
        return None
    log = Path(job.paths.stderr)
    site = crash_site(log.read_bytes().decode(errors="replace")) if log.exists() else None
    if site is not None:
        return f"its process died of a signal in {site}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    unfinished = next((line for line in lines if line.startswith("has not produced any output")), None)
    return (unfinished or lines[-1])[:300] if lines else type(error).__name__
