"""The report: one self-contained HTML page (plotly.js embedded once, so it opens with no network) holding each
run's environment, the crossover table and every figure the rows allow; optionally PNGs of the figures.

plotly.js and each figure's JSON travel gzipped in base64 (a third of their size: plotly.js alone is 4.8 MB) and
the browser unpacks them with its DecompressionStream (Chromium 80, Firefox 113, Safari 16.4 and later)."""

import base64
import gzip
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.io as pio
from plotly.offline import get_plotlyjs

from hhbench.files import make_folder, open_output
from hhbench.report import figures as F
from hhbench.report.labels import variant_colours
from hhbench.rows.sources import Run
from hhbench.tables.compare import BASELINE, compare_runs, crossover_table

PLOT_CONFIG = {"displaylogo": False, "responsive": True}
PNG_WIDTH = 1400
ENV_VERSIONS = ("torch", "triton", "fla-core", "flash-linear-attention", "flash-attn")


@dataclass
class Report:
    """The report's content: the runs, the figures drawn, those omitted with their reasons, and the crossover table."""

    runs: list[Run]
    figures: list[F.Figure]
    omitted: list[F.Omitted] = field(default_factory=list)
    crossovers: pd.DataFrame = field(default_factory=pd.DataFrame)  # crossover_table's view

    def to_html(self) -> str:
        """The whole page as one self-contained HTML string (plotly.js embedded once)."""
        sections = []
        for figure in self.figures:
            plot = (
                f'<div id="{figure.slug}" class="plotly-graph-div"></div>'
                f'<script>draw("{figure.slug}", "{packed(figure.figure.to_json())}")</script>'
            )
            caption = f'<p class="caption">{html.escape(figure.caption)}</p>' if figure.caption else ""
            sections.append(f'<section class="figure"><h2>{html.escape(figure.title)}</h2>{caption}{plot}</section>')
        omitted = "".join(f"<li>{html.escape(o.title)}: {html.escape(o.reason)}</li>" for o in self.omitted)
        crossovers = self.crossovers.to_html(index=False, classes="data", border=0) if not self.crossovers.empty else ""
        return PAGE.format(
            title=html.escape("hhbench report: " + ", ".join(run.label for run in self.runs)),
            plotlyjs=packed(get_plotlyjs()),
            config=json.dumps(PLOT_CONFIG),
            environment=environment_table(self.runs),
            crossovers=f"<h2>From which context head-level beats {BASELINE}</h2>{crossovers}" if crossovers else "",
            omitted=f"<h2>Not drawn</h2><ul>{omitted}</ul>" if omitted else "",
            figures="\n".join(sections),
        )

    def write_html(self, path: str | Path) -> None:
        """Write to_html to `path`; raises UserError for an unwritable path."""
        with open_output(path, "w") as out:
            out.write(self.to_html())

    def write_png(self, folder: str | Path) -> list[Path]:
        """Each figure as a PNG, through kaleido and a local Chromium. Raises RuntimeError saying why not."""
        folder = Path(folder)
        paths = [folder / f"{figure.slug}.png" for figure in self.figures]
        make_folder(folder)  # a bad folder is the user's input (UserError, exit 2), not a missing tool
        try:
            plots = [figure.figure for figure in self.figures]
            heights = [plot.layout.height for plot in plots]
            pio.write_images(plots, paths, width=PNG_WIDTH, height=heights)
        except Exception as exc:  # kaleido missing, no Chromium, or Chromium refusing to start: all one message
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(reason) from None
        return paths


def build_report(runs: list[Run]) -> Report:
    """The Report of `runs`: performance figures from compare_runs' rows (where a run has them), the quality figure
    and, for distillation runs, the training curve."""
    comparison = compare_runs(runs) if any(run.rows for run in runs) else None
    rows = comparison.rows if comparison is not None else pd.DataFrame()
    eval_frames = [run.eval_frame() for run in runs if run.eval_rows]
    eval_rows = pd.concat(eval_frames, ignore_index=True) if eval_frames else pd.DataFrame()
    train_rows = pd.DataFrame([{**row, "run": run.label} for run in runs for row in run.train_rows])
    # one colour per variant for the whole page: a variant keeps it from the latency to the loss figure
    colours = variant_colours(
        [variant for frame in (rows, eval_rows, train_rows) if not frame.empty for variant in frame["variant"]]
    )
    made: list[F.Figure | F.Omitted] = []
    if not rows.empty:
        made.append(F.latency_figure(rows, ["prefill", "train"], "latency", "Latency against context", colours))
        made.append(F.floor_figure(rows, colours))
        made.append(F.speedup_figure(rows))
        made += F.flops_figures(rows)
        made += F.memory_figures(rows, colours)
        made.append(F.roofline_figure(rows, {run.label: run.env for run in runs}, colours))
        made.append(F.latency_figure(rows, ["decode"], "decode", "Decode latency against context", colours))
        kernels = F.kernel_figure(rows)
        if isinstance(kernels, F.Figure):  # profiled runs only (sweep --profile): others have none to miss
            made.append(kernels)
    made.append(F.quality_figure(eval_rows, colours))
    if not train_rows.empty:  # distillation runs only: other runs have no curve to miss
        made.append(F.training_figure(train_rows, colours))
    return Report(
        runs=runs,
        figures=[item for item in made if isinstance(item, F.Figure)],
        omitted=[item for item in made if isinstance(item, F.Omitted)],
        crossovers=crossover_table(comparison.crossovers, len(runs) > 1) if comparison is not None else pd.DataFrame(),
    )


def packed(text: str) -> str:
    """The text gzipped, in base64: what the page's `unpack` reads back."""
    return base64.b64encode(gzip.compress(text.encode(), mtime=0)).decode("ascii")


def environment_table(runs: list[Run]) -> str:
    """One line per run: where and with what its rows were produced."""
    header = ["run", "rows", "device", "GPU", "versions", "hhbench commit", "peaks", "recorded"]
    lines = []
    for run in runs:
        env = run.env
        gpu = env.get("gpu") or {}
        gpu_text = ", ".join(f"{k} {gpu[k]}" for k in ("name", "sm_count", "capability") if gpu.get(k))
        versions = env.get("versions") or {}
        version_text = ", ".join(f"{name} {versions[name]}" for name in ENV_VERSIONS if versions.get(name))
        peaks = env.get("peaks") or {}
        peak_text = ", ".join(f"{k} {v:.4g}" for k, v in peaks.items() if isinstance(v, int | float))
        counts = pd.Series([row.status for row in run.rows]).value_counts()
        row_text = ", ".join(f"{count} {status}" for status, count in counts.items())
        if run.eval_rows:
            row_text += f"{', ' if row_text else ''}{len(run.eval_rows)} quality"
        cells = [run.label, row_text, env.get("device", "not recorded"), gpu_text, version_text,
                 env.get("hhbench_commit") or "", peak_text, env.get("time", "")]  # fmt: skip
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{name}</th>" for name in header) + "</tr>"
    return f"<table class='data'><thead>{head}</thead><tbody>{''.join(lines)}</tbody></table>"


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table.data {{ border-collapse: collapse; font-size: 0.85em; }}
table.data td, table.data th {{ border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: left; vertical-align: top; }}
section.figure {{ margin-top: 2em; }}
p.caption {{ color: #555; font-size: 0.9em; }}
</style>
<script>
async function unpack(packed) {{
  const bytes = Uint8Array.from(atob(packed), c => c.charCodeAt(0));
  return new Response(new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"))).text();
}}
const plotly = unpack("{plotlyjs}").then(code => {{
  const script = document.createElement("script");  // runs plotly.js as if inline: window.Plotly
  script.textContent = code;
  document.head.append(script);
}});
function draw(id, figure) {{
  Promise.all([plotly, unpack(figure)])
    .then(([, json]) => {{ const f = JSON.parse(json); return Plotly.newPlot(id, f.data, f.layout, {config}); }})
    .catch(error => {{ document.getElementById(id).textContent = `not drawn: ${{error}}`; throw error; }});
}}
</script>
</head>
<body>
<h1>{title}</h1>
<h2>Runs</h2>
{environment}
{crossovers}
{omitted}
{figures}
</body>
</html>
"""
