"""A launched sweep, as `hhbench sweep --gpus N|all` or `--launcher local|slurm --shards N` runs it: the run
merged, the unfinished points dealt to workers, the workers run (or submitted), the run merged again."""

import time
from dataclasses import dataclass, field, replace

import torch

from hhbench.errors import UserError
from hhbench.launch import cluster
from hhbench.launch.cluster import Slurm
from hhbench.launch.local import run_workers, sigterm_raises, visible_gpus, worker_name
from hhbench.launch.merge import merge, settled
from hhbench.launch.shards import Shard, deal, unfinished
from hhbench.launch.worker import Task
from hhbench.measure.timing import TimingPolicy
from hhbench.plan.grid import Point
from hhbench.rows.runs import RunDir
from hhbench.rows.schema import RowSet, read_rows
from hhbench.runner.sweep import POINT, asked_extras, complete_rows, finished_rows, measure_again, prepare_env

LAUNCHERS = ("local", "slurm")


@dataclass(frozen=True)
class Launch:
    """How a sweep is spread: over `gpus` of this machine, or over `shards` submitted through `launcher`."""

    gpus: list[str] = field(default_factory=list)  # CUDA_VISIBLE_DEVICES names, one worker each
    launcher: str = ""
    shards: int = 0
    slurm: Slurm | None = None
    dry_run: bool = False

    @classmethod
    def from_flags(cls, gpus: str, launcher: str, shards: int | None, slurm: dict, dry_run: bool, device: str,
                   crosscheck: int) -> "Launch":  # fmt: skip
        """The sweep's launch flags checked together. `slurm` holds --slurm-partition, --slurm-gpus-per-node,
        --slurm-time and --slurm-account as given (None or "" where not). Raises UserError."""
        given = [f"--slurm-{k.replace('_', '-')}" for k, v in slurm.items() if v not in (None, "")]
        if launcher and launcher not in LAUNCHERS:
            raise UserError(f"unknown --launcher {launcher!r}: choose local or slurm")
        if given and launcher != "slurm":
            raise UserError(f"{given[0]} is for --launcher slurm")
        if shards is not None and not launcher:
            raise UserError("--shards is for --launcher local or slurm (--gpus gives one worker per GPU)")
        if shards is not None and shards < 1:
            raise UserError(f"--shards must be >= 1, got {shards}")
        if gpus and launcher:
            raise UserError("give either --gpus (this machine) or --launcher (submitit jobs), not both")
        if (gpus or launcher) and crosscheck:
            raise UserError("--crosscheck runs in a single-process sweep: drop --gpus or --launcher")
        if dry_run and not (gpus or launcher):
            raise UserError("--dry-run shows how a sweep is spread: use it with --gpus or --launcher")
        if launcher:
            cluster.import_submitit()
            options = {}
            if launcher == "slurm":
                minutes = cluster.parse_time(slurm["time"]) if slurm.get("time") else 60
                per_node = slurm.get("gpus_per_node")
                options["slurm"] = Slurm(slurm.get("partition") or "", 1 if per_node is None else per_node, minutes,
                                         slurm.get("account") or "")  # fmt: skip
                if not dry_run:
                    cluster.check_submission()
            return cls(launcher=launcher, shards=shards or 1, dry_run=dry_run, **options)
        if not gpus:
            return cls()
        if device == "cpu":
            raise UserError("--gpus gives each worker a GPU: drop --device cpu")
        found = visible_gpus()
        if gpus == "all":
            count = len(found)
        elif gpus.isascii() and gpus.isdigit() and int(gpus) >= 1:  # str.isdigit takes '²', which int() refuses
            count = int(gpus)
        else:
            raise UserError(f"--gpus {gpus!r}: give a number of GPUs (>= 1) or all")
        if not found or count > len(found):
            raise UserError(f"--gpus {gpus}: this machine has {len(found)} GPU(s) visible to torch")
        return cls(gpus=found[:count], dry_run=dry_run)

    @property
    def active(self) -> bool:
        """Whether the sweep is launched (--gpus or --launcher) rather than run inline in this process."""
        return bool(self.gpus or self.launcher)

    def slurm_device(self) -> torch.device | None:
        """Where a SLURM array's points run (the submitting machine may have no GPU); None without SLURM."""
        if self.launcher != "slurm":
            return None
        return torch.device("cuda" if self.slurm.gpus_per_node else "cpu")


@dataclass
class Launched:
    """What a launched sweep did: the run's rows, its counts, the shards it dealt and what went wrong."""

    rows: RowSet = field(default_factory=RowSet)
    new: int = 0
    skipped: int = 0
    completed: int = 0  # finished rows whose profile or floor was measured again before the workers (complete_rows)
    plan: list[tuple[str, Shard]] = field(default_factory=list)  # (worker or shard, its points)
    failures: list[str] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)  # SLURM job ids
    busy: list[str] = field(default_factory=list)  # shards with a live worker, not submitted again
    script: str = ""  # --dry-run with SLURM: the sbatch script


def _done_keys(run: RunDir, retry: bool, asked: dict) -> set[tuple]:
    """Keys of the run's rows, merged or not, but those whose point is measured again whole (measure_again: with
    `retry`, error and oom rows); read only, for --dry-run."""
    paths = [run.rows_path, *(run.shard(name).rows for name in run.shard_names())]
    rows = [row for path in paths if path.exists() for row in read_rows(path)]
    return {row.key for row in rows if measure_again(row, retry, asked) != (POINT,)}


def _writes(worker: str, shard: str) -> bool:
    """Whether the busy `worker` (a shard file's name, or a queued SLURM task's shard) writes shard `shard`: the
    shard itself, or one of its GPU workers (worker_name's SHARD-gpuK)."""
    return worker == shard or worker.startswith(worker_name(shard, ""))


def launch(
    points: list[Point],
    run: RunDir,
    where: torch.device,
    policy: TimingPolicy,
    options: Launch,
    suite_name: str = "",
    isolate: bool = False,
    retry: bool = False,
    threads: int = 0,
    on_progress=None,
) -> Launched:
    """Measure (or submit, or with dry_run only plan) `points` into `run` as `options` spread them; a launch on
    this machine adds its wall time to its session in env.json (wall_s). The caller holds the run lock
    (hhbench.launch.lock.run_lock), except for a dry run, which writes nothing."""
    started = time.monotonic()
    busy, completed = [], 0
    if options.dry_run:
        done = _done_keys(run, retry, asked_extras(points))
    else:
        busy = (settled if options.gpus else merge)(run).busy  # --launcher leaves a live worker's shard be
        if options.launcher != "slurm":
            prepare_env(run, suite_name, where, len(options.gpus) or options.shards)
            if where.type == "cuda":
                torch.cuda.empty_cache()  # the peaks' buffers: GPU 0's worker needs its memory
        asked = asked_extras(points)
        rows = finished_rows(run, retry, asked)
        if options.launcher == "slurm" and any(measure_again(row, retry, asked) for row in rows):
            raise UserError(
                f"finished rows of {run.path} need their profile or floor measured again: run this sweep once "
                "without --launcher on a machine with the run's device, then submit the rest"
            )
        # before the workers start, each row in a fresh process (isolate): an addition that killed a worker (a
        # SIGSEGV in the profile) fails again on its row instead of ending the launch; a completed row replaces its
        # old one in rows.jsonl
        completed = complete_rows(points, run, rows, where, policy, retry, isolate=True)
        done = {row.key for row in rows}
    todo = [point for point in points if point.identity not in done]
    outcome = Launched(skipped=len(points) - len(todo) - completed, completed=completed)
    if options.gpus:
        shards = deal(todo, len(options.gpus), policy)
        outcome.plan = [(worker_name("", gpu), shard) for gpu, shard in zip(options.gpus, shards, strict=True)]
    else:
        dealt = deal(points, options.shards, policy)
        shards = unfinished(dealt, done, policy)
        if options.launcher == "slurm":
            busy = [*busy, *cluster.queued_shards(run)]
        other = [b for b in busy if not any(_writes(b, shard.name) for shard in dealt)]
        if other:  # another dealing of the plan: its points would be measured twice, side by side
            raise UserError(f"workers of an earlier sweep with another --shards still write {run.path}: "
                            f"{', '.join(other)}; wait for them or rerun with their --shards")  # fmt: skip
        outcome.busy = [s.name for s in shards if any(_writes(b, s.name) for b in busy)]
        outcome.plan = [(s.name, s) for s in shards if s.name not in outcome.busy]
    if options.dry_run:
        if options.launcher == "slurm":
            outcome.script = cluster.sbatch_script(run, options.slurm, len(outcome.plan))
        return outcome
    template = Task(str(run.path), "", (), policy, suite_name, where.type, isolate, threads)
    tasks = [replace(template, name=name, points=shard.points) for name, shard in outcome.plan]
    if options.launcher == "slurm":
        outcome.submitted = cluster.submit_slurm(run, tasks, options.slurm) if tasks else []
        outcome.rows = run.rows()
        return outcome
    try:
        if options.gpus:
            with sigterm_raises():  # the workers stopped and their rows merged (below), as on Ctrl-C
                outcome.failures = run_workers(run, tasks, options.gpus, on_progress)
        else:
            gpus = visible_gpus() if where.type == "cuda" else []  # --device cpu: the jobs on the CPU alone
            outcome.failures = cluster.run_local(run, tasks, gpus, on_progress)
    finally:  # interrupted too (the workers are stopped by then): what they measured is merged, the time kept
        _merged(run, outcome, started)
    return outcome


def _merged(run: RunDir, outcome: Launched, started: float) -> None:
    merged = merge(run)
    outcome.rows, outcome.new = merged.rows, merged.added
    env = run.env()
    env["sessions"][-1]["wall_s"] = round(time.monotonic() - started, 1)
    run.write_env(env)
