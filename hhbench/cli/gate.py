"""`hhbench gate BASELINE CANDIDATE`: exit 0 when the candidate holds, 1 on a regression, 2 on bad input."""

from pathlib import Path
from typing import Annotated

import typer

from hhbench.cli.app import app
from hhbench.errors import UserError
from hhbench.gate.check import METRICS, gate, parse_metrics, parse_slowdown
from hhbench.rows.runs import ROWS, RunDir
from hhbench.rows.sources import Run, load_run


@app.command(name="gate")
def gate_command(
    baseline: Annotated[str, typer.Argument(help="Baseline run folder or rows JSON-lines file.")],
    candidate: Annotated[str, typer.Argument(help="Candidate run folder or rows JSON-lines file.")],
    max_slowdown: Annotated[
        str,
        typer.Option(
            help="Smallest latency slowdown (median) that fails, when the samples' test finds it: 5% or 0.05."
        ),
    ] = "5%",
    metrics: Annotated[str, typer.Option(help=f"What to gate, comma-separated: {', '.join(METRICS)}.")] = ",".join(
        METRICS
    ),
    json_path: Annotated[str, typer.Option("--json", help="Also write the gate's report as JSON.")] = "",
    update: Annotated[
        bool, typer.Option(help="Write the candidate as the new baseline (after reporting against the old one).")
    ] = False,
):
    """Gate a candidate run against a baseline, row by row on the configuration key."""
    slowdown, chosen = parse_slowdown(max_slowdown), parse_metrics(metrics)
    new = _load_nonempty(candidate)
    if update and not Path(baseline).exists():
        _write_baseline(new, Path(baseline))
        return
    old = _load_nonempty(baseline)
    report = gate(old.rows, new.rows, chosen, slowdown, (str(old.path), str(new.path)))
    if json_path:
        report.to_json(json_path)
    typer.echo(report.to_markdown(), nl=False)
    if update:
        _write_baseline(new, old.path)
    elif not report.passed:
        raise SystemExit(1)


def _load_nonempty(path: str) -> Run:
    run = load_run(path)
    if not run.rows:
        raise UserError(f"{run.path} holds no performance rows")
    return run


def _write_baseline(candidate: Run, target: Path) -> None:
    """A folder gets rows.jsonl and the candidate's env.json; a JSON-lines file is replaced by the rows."""
    if target.suffix == ".jsonl":
        candidate.rows.to_jsonl(target)
    else:
        folder = RunDir(target)
        candidate.rows.to_jsonl(target / ROWS)
        if candidate.env:
            folder.write_env(candidate.env)
        else:  # an older baseline's environment would describe rows it no longer holds
            folder.env_path.unlink(missing_ok=True)
    typer.echo(f"baseline {target} now holds the {len(candidate.rows)} rows of {candidate.path}")
