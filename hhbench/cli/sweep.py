"""`hhbench sweep`: measure hybrid kernels, layers and models over a grid, into results/<run>/."""

import dataclasses
import re
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hhbench.cli.app import app
from hhbench.errors import UserError
from hhbench.files import run_folder
from hhbench.launch.lock import run_lock
from hhbench.rows.runs import RunDir
from hhbench.rows.schema import RowSet, markdown_table
from hhbench.spec.units import parse_count, split_list

Opt = typer.Option
SUMMARY = ["variant", "ratio_effective", "pass", "scope", "context", "batch", "mode", "fa_backend", "gdn_backend",
           "status", "latency_ms", "latency_p10_ms", "latency_p90_ms", "vs_floor", "tflops", "flops_ratio", "reason"]  # fmt: skip


def set_cpu_threads(threads: int, where) -> None:
    """--threads: torch's CPU threads when running on the CPU (0: torch's default)."""
    import torch

    if threads < 0:
        raise UserError(f"--threads must be >= 0, got {threads}")
    if threads and where.type == "cpu":
        torch.set_num_threads(threads)


def default_run_name(suite: str, device, graph: bool = False) -> str:
    """The run folder's default name: '<suite>-<device>' with the GPU's name (or 'cpu') in lower-case and dashes,
    '<suite>-graph-<device>' where every step is timed as CUDA graphs (`graph`), apart from the eager run's rows.
    UserError where the points run on a GPU this machine does not have (a SLURM array submitted from a login node):
    there is no GPU to name the run after."""
    import torch

    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "this machine has no GPU to name the run after (--launcher slurm runs on the nodes'): give --run"
        )
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    return f"{suite}-{'graph-' * graph}{re.sub(r'[^a-z0-9]+', '-', where.lower()).strip('-')}"


def summary(rows: RowSet) -> str:
    """The run's rows for reading; flops_ratio against the run's layer:3:1 row where it has one (tables.compare)."""
    from hhbench.tables.compare import against_layer31

    if not rows:  # a launch whose every shard a live worker still writes has merged nothing yet
        return "no rows yet"
    frame = against_layer31(rows.frame())
    columns = [c for c in SUMMARY if c in frame and frame[c].notna().any() and (frame[c] != "").any()]
    view = frame[columns].rename(columns={"tflops": "TFLOP/s"})
    for column in ("latency_ms", "latency_p10_ms", "latency_p90_ms"):
        if column in view:
            view[column] = view[column].map(lambda v: f"{v:.4g}" if v == v and v is not None else "")
    if "reason" in view:
        view["reason"] = view["reason"].str.slice(0, 60)
    return markdown_table(view)


@app.command()
def sweep(
    suite: Annotated[
        str, Opt(help="Suite name (suites/NAME.toml) or path. Default: 'default' on a GPU, 'cpu' otherwise.")
    ] = "",
    models: Annotated[str, Opt(help="Presets or config.json paths, comma-separated.")] = "",
    set_: Annotated[list[str], Opt("--set", help="Shape override field=value (repeatable).")] = [],  # noqa: B006
    layouts: Annotated[str, Opt(help="head, layer, fa, la.")] = "",
    ratios: Annotated[str, Opt(help="LA:FA ratios.")] = "",
    contexts: Annotated[str, Opt(help="Context lengths: 4k, 4096, 1m.")] = "",
    batch: Annotated[str, Opt(help="Batch sizes, comma-separated.")] = "",
    passes: Annotated[str, Opt("--passes", "--pass", help="prefill, train, decode.")] = "",
    scopes: Annotated[str, Opt(help="kernel, layer, model.")] = "",
    fa_backend: Annotated[
        str,
        Opt(
            help="FA backend(s): auto, sdpa-cudnn, sdpa-flash, sdpa-efficient, sdpa-math, flash-attn, flex, sdpa-split, triton-split."
        ),
    ] = "",
    gdn_backend: Annotated[
        str, Opt(help="GDN backend(s): auto, flash-qla, fla-chunk, fla-recurrent, torch-chunk, torch-recurrent.")
    ] = "",
    dtype: Annotated[str, Opt(help="bf16, fp16, fp32.")] = "",
    mode: Annotated[str, Opt("--mode", "--modes", help="Head-level execution: sequential, streams.")] = "",
    head_map: Annotated[str, Opt(help="Head-map JSON for the head layout.")] = "",
    kv_aware: Annotated[bool, Opt(help="Pack FA heads into as few KV groups as possible.")] = False,
    parts: Annotated[bool, Opt(help="Also time the FA and GDN parts alone (kernel scope, head layout).")] = False,
    floor: Annotated[
        bool, Opt(help="Time each layer and model point's floor: its necessary kernels alone (floor_ms, vs_floor).")
    ] = True,
    profile: Annotated[
        bool,
        Opt(
            help="Also profile each point's step kernel by kernel under torch.profiler, apart from its timing "
            "(extra.kernels; `hhbench table --kernels`)."
        ),
    ] = False,
    device: Annotated[str, Opt(help="auto, cpu or cuda.")] = "auto",
    run: Annotated[
        str | None, Opt(help="Run name: results go to OUT/RUN/. Default: SUITE-DEVICE (rerun to resume).")
    ] = None,
    out: Annotated[str, Opt(help="Folder holding runs.")] = "results",
    isolate: Annotated[bool, Opt(help="Measure each point in its own subprocess (CUDA errors are sticky).")] = False,
    crosscheck: Annotated[
        int, Opt(help="Time this many kernel points again with triton's do_bench; fail beyond 5%.")
    ] = 0,
    retry_errors: Annotated[
        bool,
        Opt(help="Measure again the points whose rows say error or oom, and the profiles and floors that failed."),
    ] = False,
    warmup_ms: Annotated[float | None, Opt(help="Warm-up budget per point, ms (>= 0).")] = None,
    target_ms: Annotated[float | None, Opt(help="Timed budget per point, ms (>= 0; sets the sample count).")] = None,
    min_reps: Annotated[int | None, Opt(help="Fewest timed samples (>= 1).")] = None,
    max_reps: Annotated[int | None, Opt(help="Most timed samples (>= --min-reps).")] = None,
    graph: Annotated[
        bool | None,
        Opt(help="Time every step as CUDA-graph replays (decode always is): kernels without the host's launch cost."),
    ] = None,
    threads: Annotated[
        int,
        Opt(help="CPU threads for torch (0: torch's default). One keeps small CPU kernels steady on shared machines."),
    ] = 1,
    gpus: Annotated[
        str, Opt(help="One worker process per GPU of this machine: N or all (points dealt by estimated cost).")
    ] = "",
    launcher: Annotated[
        str, Opt(help="local or slurm: the shards as submitit jobs (needs submitit, the cluster extra).")
    ] = "",
    shards: Annotated[int | None, Opt(help="Shards for --launcher (one job, or array task, each). Default 1.")] = None,
    slurm_partition: Annotated[str, Opt(help="SLURM partition of the array.")] = "",
    slurm_gpus_per_node: Annotated[
        int | None, Opt(help="GPUs of each array task, one worker each (default 1; 0: CPU).")
    ] = None,
    slurm_time: Annotated[
        str, Opt(help="Time limit of each task, SLURM's format (90, 1:30:00, 2-00). Default 60 min.")
    ] = "",
    slurm_account: Annotated[str, Opt(help="SLURM account charged.")] = "",
    dry_run: Annotated[
        bool, Opt(help="With --gpus or --launcher: print each worker's points (and the sbatch script), run nothing.")
    ] = False,
):
    """Measure latency and memory of hybrid attention over a grid; rows go to OUT/RUN/rows.jsonl as they finish."""

    from hhbench.launch.merge import settled
    from hhbench.launch.run import Launch
    from hhbench.measure.env import pick_device
    from hhbench.measure.timing import TimingPolicy
    from hhbench.plan.grid import dedupe, grid_points, load_suite
    from hhbench.runner.measurements import CROSSCHECK_MIN_MS
    from hhbench.runner.sweep import check_timer, run_sweep

    slurm = {"partition": slurm_partition, "gpus_per_node": slurm_gpus_per_node, "time": slurm_time,
             "account": slurm_account}  # fmt: skip
    spread = Launch.from_flags(gpus, launcher, shards, slurm, dry_run, device, crosscheck)
    where = spread.slurm_device() or pick_device(device)
    set_cpu_threads(threads, where)
    if crosscheck < 0:
        raise UserError(f"--crosscheck must be >= 0, got {crosscheck}")
    if crosscheck and where.type != "cuda":  # refused, not silently skipped
        raise UserError(
            f"--crosscheck times points again with triton's do_bench on CUDA, and this run is on {where.type}"
        )
    flags = {"models": models, "set": set_, "layouts": layouts, "ratios": ratios, "contexts": contexts,
             "batch": [parse_count(b, "batch") for b in split_list(batch)] or None, "passes": passes,
             "scopes": [s for s in scopes.split(",") if s] if scopes else None,
             "fa_backend": fa_backend.split(",") if fa_backend else None,
             "gdn_backend": gdn_backend.split(",") if gdn_backend else None, "dtype": dtype.split(",") if dtype else None,
             "modes": mode.split(",") if mode else None, "head_map": head_map, "kv_aware": kv_aware, "parts": parts}  # fmt: skip
    grid = {key: value for key, value in flags.items() if value not in ("", None, [], False)}
    if grid and suite:
        raise UserError("give either --suite or grid flags (--models, --ratios, ...), not both")
    if grid:
        name, points, policy = "custom", dedupe(grid_points(grid, where.type)), TimingPolicy()
    else:
        chosen = load_suite(suite or ("default" if where.type == "cuda" else "cpu"), where.type)
        name, points, policy = chosen.name, chosen.points, chosen.policy
    if not floor:
        points = [dataclasses.replace(point, floor=False) for point in points]
    if profile:  # on a suite's points too, as --no-floor: what to measure besides the latency
        points = [dataclasses.replace(point, profile=True) for point in points]
    overrides = {"warmup_ms": warmup_ms, "target_ms": target_ms, "min_reps": min_reps, "max_reps": max_reps,
                 "graph": graph}  # fmt: skip
    policy = TimingPolicy(**{**policy.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    if spread.shards > len(points):  # empty shards submit nothing, and a count far past the plan exhausts memory
        raise UserError(f"--shards {spread.shards}: the plan has {len(points)} points, give at most that many shards")
    if policy.graph and where.type != "cuda":  # refused, not silently timed eagerly (as --mode streams)
        asked = "--graph" if graph else "[timing] graph = true"
        raise UserError(f"{asked} captures CUDA graphs, and this run is on {where.type}")
    # None, not "", is no --run: --run "" (a script's unset variable) is a bad name, not the default run resumed
    run_dir = RunDir(run_folder(out, run if run is not None else default_run_name(name, where, policy.graph)))
    check_timer(run_dir, policy)
    if not suite and not grid:  # the main job: nothing on its command line says what it runs, so say it here
        why = "a CUDA GPU is visible" if where.type == "cuda" else "no CUDA GPU is visible, and 'default' needs one"
        print(f"hhbench: no --suite given: suite {name!r} ({why}), rows to {run_dir.rows_path}", file=sys.stderr)
    if spread.dry_run:
        return _dry_run(points, run_dir, where, policy, spread, retry_errors)
    run_dir.create()
    # Started at the first finished point, so that set-up errors stay one line on stderr.
    progress = Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True),
    )  # fmt: skip
    task = progress.add_task(f"sweep {name} -> {run_dir.path}", total=None)

    def on_row(row, done, total):
        if done == 1:
            progress.start()
        progress.update(task, completed=done, total=total,
                        description=f"{row.variant} {row.pass_} {row.scope} {row.context}: {row.status}")  # fmt: skip

    def on_progress(done, total):
        if not progress.live.is_started:
            progress.start()
        progress.update(task, completed=done, total=total)

    try:
        with run_lock(run_dir):
            if spread.active:
                return _launch(
                    points, run_dir, where, policy, spread, name, isolate, retry_errors, threads, on_progress, progress
                )
            if run_dir.shard_names():  # a launched sweep's shards: merged first, their points not measured again
                settled(run_dir)
            result = run_sweep(points, run_dir, where, policy, name, isolate, crosscheck, retry_errors, on_row)
    finally:
        if progress.live.is_started:
            progress.stop()
    typer.echo(summary(result.rows))
    typer.echo(f"\n{result.new} new rows, {_completed(result.completed)}{result.skipped} already in {run_dir.rows_path}; "
               f"env in {run_dir.env_path}")  # fmt: skip
    if result.crosschecked < crosscheck:
        print(
            f"hhbench: crosschecked {result.crosschecked} of the {crosscheck} points asked: only new kernel-scope "
            f"prefill and train points of at least {CROSSCHECK_MIN_MS:g} ms are",
            file=sys.stderr,
        )
    for failure in result.crosscheck_failures:
        print(f"hhbench: crosscheck beyond 5%: {failure}", file=sys.stderr)
    if result.crosscheck_failures:
        raise SystemExit(1)


def _completed(count: int) -> str:
    return f"{count} completed (profile or floor measured again on the row), " if count else ""


def _dry_run(points, run_dir: RunDir, where, policy, spread, retry) -> None:
    from hhbench.launch.run import launch

    planned = launch(points, run_dir, where, policy, spread, retry=retry)
    for name, shard in planned.plan:
        typer.echo(f"{name}: {len(shard.points)} points, about {shard.seconds:.0f} s on an H200 from cold caches")
    typer.echo(f"{planned.skipped} points already in {run_dir.path}")
    for shard in planned.busy:
        typer.echo(f"{shard} is still queued or running: not submitted again")
    if planned.script:
        typer.echo(planned.script)


def _launch(points, run_dir: RunDir, where, policy, spread, name, isolate, retry, threads, on_progress, progress):
    from hhbench.launch.run import launch

    launched = launch(points, run_dir, where, policy, spread, name, isolate, retry, threads, on_progress)
    if progress.live.is_started:
        progress.stop()
    for shard in launched.busy:
        print(f"hhbench: {shard} is still queued or running: not submitted again", file=sys.stderr)
    if spread.launcher == "slurm":
        ids = ", ".join(launched.submitted) or "nothing"
        typer.echo(f"submitted {len(launched.submitted)} shard(s) of {spread.shards}: {ids}; {launched.skipped} "
                   f"points already in {run_dir.path}. When they end: hhbench merge {run_dir.path}; rerun this "
                   "command to submit the shards with points left.")  # fmt: skip
        return
    typer.echo(summary(launched.rows))
    typer.echo(
        f"\n{launched.new} new rows, {_completed(launched.completed)}{launched.skipped} already in "
        f"{run_dir.rows_path}; env in {run_dir.env_path}"
    )
    for failure in launched.failures:
        print(f"hhbench: {failure}", file=sys.stderr)
    if launched.failures:
        raise SystemExit(1)
