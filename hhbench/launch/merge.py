"""The run's rows.jsonl and env.json as the merge of its workers' shard files (`hhbench merge RUN`, and at the
start and end of every launched sweep).

Kill-safe in any order: rows.jsonl and env.json are replaced whole before the shard files go, and a merge that
finds a row twice (killed between the two) keeps the first. A shard still locked by a live worker is left for a
later merge. A point a worker was measuring when the whole launch stopped (Ctrl-C, scancel, a job's time limit)
is not blamed: it has no row and the next sweep measures it; a point that kills its worker while the launch goes
on is blamed by the worker's supervisor (hhbench.launch.local) as an error row.
"""

from dataclasses import dataclass, field

from hhbench.errors import UserError
from hhbench.files import read_json
from hhbench.launch.lock import try_lock
from hhbench.rows.runs import RunDir
from hhbench.rows.schema import Row, RowSet, append_row, read_rows
from hhbench.runner.sweep import addition_failed

# What env.json's "workers" keeps of each worker's own env; the rest is the run's (the same machine and versions).
WORKER_FIELDS = ("host", "device", "cuda_visible_devices", "slurm_job_id", "time", "finished", "hhbench_commit",
                 "peaks")  # fmt: skip


@dataclass
class Merged:
    """What a merge of shard files into rows.jsonl did."""

    rows: RowSet  # every row of the run
    added: int = 0  # rows moved from shard files into rows.jsonl
    duplicates: int = 0  # rows whose key the run already holds (in rows.jsonl, or earlier in it), dropped
    busy: list[str] = field(default_factory=list)  # shards a live worker still writes, left as they are


def _keys(run: RunDir, name: str) -> set[tuple]:
    files = run.shard(name)
    rows = [*run.rows(), *(read_rows(files.rows) if files.rows.exists() else [])]
    return {row.key for row in rows}


def reap(run: RunDir, name: str, why: str) -> None:
    """The point worker `name` was measuring when it stopped, appended to its rows as an error row that says
    `why`, or, where it stopped inside an addition of a measured point (the floor, the profile), as that measured
    row with the addition failed (extra["<addition>_error"]: --retry-errors measures it again); nothing where it
    stopped between points (its last noted point has a row, or none was noted)."""
    files = run.shard(name)
    if not files.current.exists():
        return
    row = Row.from_dict(read_json(files.current, "the point in progress of worker"))
    if row.key not in _keys(run, name):
        if not addition_failed(row, f"worker {name} stopped while measuring it ({why})"):
            row.reason = f"worker {name} stopped while measuring this point ({why}); the other points went on"
        append_row(files.rows, row)
    files.current.unlink()


def remaining(run: RunDir, name: str, points: tuple) -> tuple:
    """Those of `points` without a row yet in the run or in worker `name`'s rows."""
    done = _keys(run, name)
    return tuple(point for point in points if point.identity not in done)


def _fold_env(env: dict, name: str, worker_env: dict) -> dict:
    if env.get("device") and worker_env.get("device") != env["device"]:
        raise UserError(
            f"worker {name} measured on {worker_env.get('device')} and this run on {env['device']}: move its "
            f"shard files out of the run's shards/ folder, or measure that shard again on {env['device']}"
        )
    if not env.get("device"):  # a run measured by workers only (SLURM): theirs is the run's machine
        mine = ("worker", "cuda_visible_devices", "slurm_job_id", "finished")
        env = {**{k: v for k, v in worker_env.items() if k not in mine}, **env}
    env.setdefault("workers", {})[name] = {k: worker_env.get(k) for k in WORKER_FIELDS}
    return env


def settled(run: RunDir) -> Merged:
    """merge(run) for a sweep that measures any point without a row itself (inline, or --gpus): refused (UserError)
    while a live worker of an earlier sweep still writes a shard, whose points it would measure beside it."""
    merged = merge(run)
    if merged.busy:
        raise UserError(f"workers of an earlier sweep still write {run.path}: {', '.join(merged.busy)}; wait for them")
    return merged


def merge(run: RunDir) -> Merged:
    """Move every finished worker's rows into rows.jsonl and its host and device into env.json["workers"], one row
    a key (the first: a key rows.jsonl holds twice keeps its first row too). Raises UserError for a worker that
    measured on another device than the run."""
    result = Merged(RowSet())
    held = []
    try:
        for name in run.shard_names():
            handle = try_lock(run.shard(name).rows)
            if handle is None:
                result.busy.append(name)
            else:
                held.append((name, handle))
        rows, seen = RowSet(), set()
        for row in read_rows(run.rows_path, repair=True) if run.rows_path.exists() else []:
            if row.key in seen:  # two sweeps that wrote the run at once, before the run lock
                result.duplicates += 1
                continue
            seen.add(row.key)
            rows.append(row)
        rewrite = bool(result.duplicates)
        env = run.env()
        for name, _ in held:
            files = run.shard(name)
            for row in read_rows(files.rows, repair=True) if files.rows.exists() else []:
                if row.key in seen:
                    result.duplicates += 1
                    continue
                seen.add(row.key)
                rows.append(row)
                result.added += 1
            if files.env.exists():
                env = _fold_env(env, name, read_json(files.env, "the env of worker"))
        if result.added or rewrite:
            rows.to_jsonl(run.rows_path)  # replaced whole: a kill leaves the old file or the new one
        if held and env:
            run.write_env(env)
        for name, _ in held:
            files = run.shard(name)
            for path in (files.rows, files.env, files.current, files.task):
                path.unlink(missing_ok=True)
        result.rows = rows
    finally:
        for _, handle in held:
            handle.close()
    return result
