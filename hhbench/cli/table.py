"""`hhbench table`: every configuration against layer-wise 3:1, as markdown on stdout."""

from typing import Annotated

import typer

from hhbench.cli.app import app
from hhbench.errors import UserError
from hhbench.rows.sources import load_runs
from hhbench.tables.compare import compare_runs


@app.command()
def table(
    runs: Annotated[list[str], typer.Argument(help="Run folders (results/<run>/) or rows JSON-lines files.")],
    csv: Annotated[str, typer.Option(help="Also write the comparison, one line per row, to this CSV file.")] = "",
    json_path: Annotated[
        str, typer.Option("--json", help="Also write the comparison, crossovers and side-by-side table as JSON.")
    ] = "",
    targets: Annotated[
        bool,
        typer.Option(help="Check the performance targets (docs/results.md) on each run instead."),
    ] = False,
    kernels: Annotated[
        bool,
        typer.Option(help="List each profiled row's top kernels instead (rows of `hhbench sweep --profile`)."),
    ] = False,
):
    """Compare every configuration with the layer-wise 3:1 row of the same run, model, context, batch, pass and
    scope: latency, speedup, FLOPs and KV-cache ratios, TFLOP/s, peak memory, and where head-level wins. Runs
    with quality rows only (hhbench eval, distilled students too): scores with 95% intervals against layer:3:1."""
    if kernels and (targets or csv or json_path):
        raise UserError("--kernels is a view of its own: give it without --targets, --csv or --json")
    if targets and (csv or json_path):
        raise UserError("--targets is a view of its own: give it without --csv or --json")
    if kernels:
        from hhbench.tables.kernels import kernels_table

        for run in load_runs(runs):
            typer.echo(kernels_table(run))
        return
    if targets:
        from hhbench.tables.targets import check_targets

        for run in load_runs(runs):
            typer.echo(check_targets(run).to_markdown())
        return
    loaded = load_runs(runs)
    for run in loaded:  # a distillation not yet evaluated: nothing to compare, which is said rather than silent
        if run.train_rows and not run.rows and not run.eval_rows:
            typer.echo(
                f"{run.path} holds only training rows (train.jsonl): see `hhbench report {run.path}` for its curves"
            )
    if not any(run.rows for run in loaded):  # quality runs only: the eval comparison, students included
        from hhbench.eval.quality import comparison_table

        for run in loaded:
            if run.eval_rows:
                typer.echo(f"## {run.label}\n\n{comparison_table(list(run.eval_rows))}\n")
        return
    comparison = compare_runs(loaded)
    if csv:
        comparison.to_csv(csv)
    if json_path:
        comparison.to_json(json_path)
    typer.echo(comparison.to_markdown(), nl=False)
