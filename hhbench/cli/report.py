"""`hhbench report`: one self-contained HTML page of figures, optionally PNGs too."""

from typing import Annotated

import typer

from hhbench.cli.app import app
from hhbench.rows.sources import load_runs


@app.command()
def report(
    runs: Annotated[list[str], typer.Argument(help="Run folders (results/<run>/) or rows JSON-lines files.")],
    out: Annotated[str, typer.Option(help="The HTML page to write.")] = "report.html",
    png: Annotated[str, typer.Option(help="Also write each figure as a PNG into this folder (needs Chromium).")] = "",
):
    """Latency, speedup, FLOPs, memory, roofline, decode and quality figures in one page that opens offline."""
    from hhbench.report.page import build_report  # plotly loads only for this command

    page = build_report(load_runs(runs))
    page.write_html(out)
    typer.echo(f"{out}: {len(page.figures)} figures" + (f", {len(page.omitted)} not drawn" if page.omitted else ""))
    if png:
        try:
            written = page.write_png(png)
        except RuntimeError as exc:
            typer.echo(f"hhbench: no PNGs written ({exc}); the HTML page is complete", err=True)
        else:
            typer.echo(f"{png}: {len(written)} PNGs")
