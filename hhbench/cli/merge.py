"""`hhbench merge RUN`: a launched run's shard files folded into its rows.jsonl and env.json."""

from pathlib import Path
from typing import Annotated

import typer

from hhbench.cli.app import app
from hhbench.errors import UserError
from hhbench.launch.lock import run_lock
from hhbench.launch.merge import merge as merge_run
from hhbench.rows.runs import ROWS, SHARDS, RunDir


@app.command()
def merge(run: Annotated[str, typer.Argument(help="Run folder (results/<run>/).")]):
    """Move the rows of every finished worker (RUN/shards/) into RUN/rows.jsonl, one row a key, and each
    worker's host and device into env.json; shards a live worker still writes are left for later. Sweeps with
    --gpus or --launcher local merge at their end; a SLURM array's run is merged here when its tasks end."""
    folder = RunDir(Path(run))
    if not (folder.path / SHARDS).is_dir() and not folder.rows_path.exists():
        raise UserError(f"no run at {folder.path}: expected a folder with {ROWS} or {SHARDS}/")
    with run_lock(folder):
        merged = merge_run(folder)
    typer.echo(
        f"{merged.added} rows merged into {folder.rows_path} ({len(merged.rows)} in all), "
        f"{merged.duplicates} duplicates dropped"
    )
    for name in merged.busy:
        typer.echo(f"{name} is still being written: merge again when it ends")
