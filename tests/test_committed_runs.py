"""Every run committed under results/ stays readable as rows are read today (older schema versions migrated):
the table compares it, the report draws it and the gate pairs it with itself."""

from pathlib import Path

import pytest

from hhbench.gate.check import METRICS, gate
from hhbench.report.page import build_report
from hhbench.rows.sources import load_run
from hhbench.tables.compare import compare_runs

RESULTS = Path(__file__).resolve().parents[1] / "results"
RUN_FILES = ("rows.jsonl", "eval.jsonl", "train.jsonl")  # a run folder's; ppl.jsonl is a script's own record
RUNS = sorted(
    {path.parent if path.name in RUN_FILES else path for path in RESULTS.rglob("*.jsonl") if path.name != "ppl.jsonl"}
)


def test_every_committed_run_is_found():
    assert len(RUNS) >= 20 and {"baseline-cpu", "gpu-default-h100", "eval-smollm2-135m"} <= {p.name for p in RUNS}


@pytest.mark.parametrize("path", RUNS, ids=lambda path: str(path.relative_to(RESULTS)))
def test_committed_run_reads_in_table_report_and_gate(path):
    run = load_run(path)
    assert run.rows or run.eval_rows or run.train_rows
    if run.rows:
        comparison = compare_runs([run])
        assert len(comparison.rows) == len(run.rows)
        report = gate(run.rows, run.rows, METRICS, 0.05, ("committed", "committed"))
        assert report.passed, report.to_markdown()
    assert build_report([run]).figures
