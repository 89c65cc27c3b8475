"""`hhbench table`: every configuration against the layer 3:1 row of its own run and point."""

import json
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pytest
from inprocess import run_main
from synthetic import analytic, measured, quality, write_run

from hhbench.rows.schema import INCORRECT, OOM, RowSet
from hhbench.rows.sources import Run, load_runs
from hhbench.spec.units import format_bytes
from hhbench.tables.compare import DISAGREE_SLOWER, compare_runs, from_context


@pytest.fixture(scope="module")
def rows() -> RowSet:
    return measured(analytic())


def single(frame: pd.DataFrame, **where) -> pd.Series:
    match = frame
    for name, value in where.items():
        match = match[match[name] == value]
    assert len(match) == 1, where
    return match.iloc[0]


def test_analytic_rows_from_hhbench_flops(cli, tmp_path):
    flops = run_main("flops", "--model", "qwen3-1.7b", "--contexts", "4k,32k,128k", "--pass", "prefill", "--json")
    assert flops.returncode == 0, flops.stderr
    source = tmp_path / "qwen.jsonl"
    source.write_text(flops.stdout)
    result = cli("table", str(source), "--csv", str(tmp_path / "t.csv"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("### qwen3-1.7b, prefill, model scope\n")
    header = next(line for line in out.splitlines() if line.startswith("| context"))
    assert header == "| context | variant | ratio_effective | status | flops_ratio | kv_ratio | note |"
    assert "| 32k | layer:3:1 | 3:1 | analytic | 1.000 | 1.000 |  |" in out
    assert out.endswith(
        "| model | scope | pass | variant | from (FLOPs) | longest context |\n|---|---|---|---|---|---|\n"
        "| qwen3-1.7b | model | prefill | head:1:1 | never | 128k |\n"
        "| qwen3-1.7b | model | prefill | head:3:1 | never | 128k |\n"
        "| qwen3-1.7b | model | prefill | head:7:1 | 4k | 128k |\n"
        "| qwen3-1.7b | model | prefill | head:15:1 | 4k | 128k |\n"
    )
    frame = pd.read_csv(tmp_path / "t.csv").merge(pd.read_json(source, lines=True), on=["variant", "context", "pass"])
    # the table's FLOPs ratio is the one `hhbench flops` printed beside its rows
    assert frame["flops_ratio"].to_numpy() == pytest.approx(frame["vs_layer31_flops"].to_numpy())


def test_measured_speedups_notes_and_crossover(rows):
    comparison = compare_runs([Run("gpu", None, rows)])
    frame = comparison.rows
    layer = single(frame, variant="layer:3:1", context=4096, **{"pass": "prefill"})
    head = single(frame, variant="head:7:1", context=4096, **{"pass": "prefill"})
    assert head["speedup"] == pytest.approx(layer["latency_ms"] / head["latency_ms"])
    assert head["flops_ratio"] == pytest.approx(head["flops_total"] / layer["flops_total"])
    assert head["kv_ratio"] == pytest.approx(head["kv_cache_bytes"] / layer["kv_cache_bytes"])
    assert layer["speedup"] == 1.0
    # FLOPs say head 7:1 is cheaper from 1k on, but its per-call overhead keeps it slower at 1k: marked
    short = single(frame, variant="head:7:1", context=1024, **{"pass": "prefill"})
    assert short["flops_ratio"] < 1 < 1 / short["speedup"] and short["note"] == DISAGREE_SLOWER
    # the crossover is the first context from which every longer one is faster
    series = frame[(frame["variant"] == "head:7:1") & (frame["pass"] == "prefill")].sort_values("context")
    wins = list(series["speedup"] > 1)
    assert wins == [False, False, True, True]
    line = single(comparison.crossovers, variant="head:7:1", **{"pass": "prefill"})
    assert line["from_context_latency"] == 4096 and line["from_context_flops"] == 1024
    text = comparison.to_markdown()
    assert "| tiny | model | prefill | head:7:1 | 4k | 1k | 16k |" in text
    assert "| tiny | model | decode | head:7:1 | never | 256 | 16k |" in text
    line = next(line for line in text.splitlines() if "| sdpa | reference | 1k | head:7:1 | 7:1 | ok |" in line)
    # the floor (the synthetic rows' FLOPs at the rate, without the per-call overhead) and latency over it
    assert short["vs_floor"] == pytest.approx(short["latency_ms"] / short["floor_ms"]) and short["vs_floor"] > 1
    floor = f"{short['floor_ms']:.4g} | {short['vs_floor']:.3f}"
    numbers = f"{short['speedup']:.3f} | {floor} | {short['flops_ratio']:.3f} | 1.000 | {short['tflops']:.4g}"
    assert line.endswith(f"| {numbers} | {format_bytes(short['peak_mem_bytes'])} | fewer FLOPs, slower |")
    header = next(line for line in text.splitlines() if line.startswith("| batch") or "| context |" in line)
    assert "| speedup | floor_ms | vs_floor | flops_ratio |" in header


def test_rows_without_a_floor_show_no_floor_columns(rows):
    bare = RowSet(replace(row, floor_ms=None, vs_floor=None) for row in rows)
    text = compare_runs([Run("gpu", None, bare)]).to_markdown()
    assert "floor_ms" not in text and "vs_floor" not in text


def test_crossover_needs_every_longer_context():
    contexts = pd.Series([1, 2, 3, 4, 5])
    assert from_context(contexts, pd.Series([False, True, False, True, True])) == 4
    assert from_context(contexts, pd.Series([True, True, True, True, False])) is None
    assert from_context(contexts, pd.Series([True] * 5)) == 1


def test_failed_rows_keep_their_status_and_never_enter_a_ratio(rows):
    changed = RowSet(rows)
    for index, row in enumerate(changed):
        if row.context == 4096 and row.pass_ == "prefill" and row.variant == "head:3:1":
            changed[index] = replace(row, status=OOM, reason="CUDA out of memory", latency_ms=None)
        if row.context == 4096 and row.pass_ == "prefill" and row.variant == "head:7:1":
            changed[index] = replace(row, status=INCORRECT, reason="max rel err 0.3")
        if row.context == 1024 and row.pass_ == "prefill" and row.variant == "layer:3:1":
            changed[index] = replace(row, status=OOM, reason="CUDA out of memory", latency_ms=None)
    frame = compare_runs([Run("gpu", None, changed)]).rows
    oom = single(frame, variant="head:3:1", context=4096, **{"pass": "prefill"})
    assert pd.isna(oom["speedup"]) and oom["note"] == "oom: CUDA out of memory" and oom["flops_ratio"] == 1.0
    wrong = single(frame, variant="head:7:1", context=4096, **{"pass": "prefill"})
    assert pd.isna(wrong["speedup"]) and pd.isna(wrong["flops_ratio"]) and pd.isna(wrong["kv_ratio"])
    assert wrong["note"] == "incorrect: max rel err 0.3"
    # with its baseline out of memory, no row of that point has a speedup
    assert frame[(frame["context"] == 1024) & (frame["pass"] == "prefill")]["speedup"].isna().all()


def test_pure_layouts_match_the_baseline_of_their_one_backend(rows):
    frame = compare_runs([Run("gpu", None, rows)]).rows
    assert single(frame, variant="fa", context=256, **{"pass": "decode"})["gdn_backend"] == ""
    assert frame["speedup"].notna().all()
    # two layer 3:1 rows with different GDN backends: a pure FA row cannot tell which is its baseline
    other = [replace(row, gdn_backend="fla") for row in rows if row.variant in ("layer:3:1", "head:7:1")]
    frame = compare_runs([Run("gpu", None, RowSet([*rows, *other]))]).rows
    assert frame.loc[frame["variant"] == "fa", "speedup"].isna().all()
    assert frame.loc[frame["variant"] == "la", "speedup"].notna().all()  # la runs the GDN backend: exact match
    fla = frame[(frame["variant"] == "head:7:1") & (frame["gdn_backend"] == "fla")]
    assert (fla["base_gdn_backend"] == "fla").all() and len(fla) == 8


def test_runs_side_by_side_keep_their_identity(tmp_path, rows):
    slower = RowSet(replace(row, latency_ms=row.latency_ms * 2, latency_p10_ms=None, latency_p90_ms=None) for row in rows)  # fmt: skip
    slower = RowSet(replace(row, fa_backend="flash" if row.fa_backend else "", gdn_backend="fla" if row.gdn_backend else "") for row in slower)  # fmt: skip
    a = write_run(tmp_path / "a" / "run", rows)
    b = write_run(tmp_path / "b" / "run", slower)
    result = run_main("table", str(a), str(b), "--json", str(tmp_path / "t.json"))
    assert result.returncode == 0, result.stderr
    assert "### tiny, prefill, model scope — run a/run" in result.stdout
    assert "### tiny, prefill, model scope — run b/run" in result.stdout
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["runs"] == ["a/run", "b/run"] and data["measured"] is True
    side = pd.DataFrame(data["side_by_side"])
    assert len(side) == len(rows)  # backends are each run's identity, not part of the match
    assert side["latency_ms b/run/a/run"].to_numpy() == pytest.approx(2.0)
    assert side["speedup@b/run"].to_numpy() == pytest.approx(side["speedup@a/run"].to_numpy())
    assert "| latency_ms b/run/a/run |" in result.stdout.splitlines()[-len(rows) - 2]


def test_runs_side_by_side_match_rows_whose_backends_differ_and_show_them(tmp_path, rows):
    """A backend chosen per point in one run (fla for decode, reference for prefill) was kept in the match, so that
    run's decode rows and another run's, on the reference backend, were left out of the table without a word."""
    per_pass = RowSet(replace(row, gdn_backend="fla") if row.gdn_backend and row.pass_ == "decode" else row for row in rows)  # fmt: skip
    slower = RowSet(replace(row, latency_ms=row.latency_ms * 2) for row in rows)
    a = write_run(tmp_path / "a", per_pass)
    b = write_run(tmp_path / "b", slower)
    result = run_main("table", str(a), str(b), "--json", str(tmp_path / "t.json"))
    assert result.returncode == 0, result.stderr
    side = pd.DataFrame(json.loads((tmp_path / "t.json").read_text())["side_by_side"])
    assert len(side) == len(rows) and side["latency_ms b/a"].to_numpy() == pytest.approx(2.0)
    head = single(side, variant="head:3:1", context=1024, **{"pass": "decode"})
    assert (head["gdn_backend@a"], head["gdn_backend@b"]) == ("fla", "reference")
    fa = single(side, variant="fa", context=1024, **{"pass": "decode"})
    assert (fa["gdn_backend@a"], fa["gdn_backend@b"]) == ("", "")  # runs no GDN kernel
    assert "fa_backend@a" not in side and "dtype@a" not in side  # one value in each run: its identity
    table = result.stdout.split("### Runs side by side")[1]
    assert "| gdn_backend@a | latency_ms@a | speedup@a | gdn_backend@b |" in table
    assert any(line.startswith("| decode ") and "| fla | " in line and "| reference | " in line
               for line in table.splitlines())  # fmt: skip


def test_bad_input_exits_2_with_one_line(tmp_path, rows):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good = write_run(tmp_path / "good", rows)
    twice = write_run(tmp_path / "twice", RowSet([*rows, rows[0]]))
    cases = [
        ([str(tmp_path / "nowhere")], "no run at"),
        ([str(empty)], "empty.jsonl holds no rows"),
        ([str(good), str(tmp_path / "." / "good" / "rows.jsonl")], "is given twice"),
        ([str(good), "--csv", "/proc/version/t.csv"], "cannot write /proc/version/t.csv"),
        # runs concatenated by hand: each copy was compared with layer:3:1, where the gate refuses them
        ([str(twice)], f"{twice} has two rows for one configuration: tiny {rows[0].variant} prefill model 256"),
    ]
    for args, message in cases:
        result = run_main("table", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)


def test_a_quality_run_gets_the_quality_comparison_with_intervals(tmp_path):
    folder = tmp_path / "quality"
    folder.mkdir()
    RowSet([replace(row, metric="acc") for row in quality(("teacher", "layer:3:1", "head:7:1@d"))]).to_jsonl(
        folder / "eval.jsonl"
    )
    result = run_main("table", str(folder))
    assert result.returncode == 0, result.stderr
    assert (
        "| passkey | acc | 1k | 0.980 [0.930, 0.994] (+0.020) | 0.960 [0.902, 0.984] | 0.940 [0.875, 0.972] (-0.020) |"
        in result.stdout
    )  # Wilson's intervals of 98, 96 and 94 of 100 prompts


def test_clashing_run_names_get_their_parents(tmp_path, rows):
    runs = load_runs([write_run(tmp_path / "x" / "gpu", rows), write_run(tmp_path / "y" / "gpu", rows)])
    assert [run.label for run in runs] == ["x/gpu", "y/gpu"]


def test_distilled_students_are_compared_with_the_baseline_distilled_in_their_run(tmp_path):
    folder = tmp_path / "quality"
    folder.mkdir()
    variants = ("teacher", "layer:3:1", "layer:3:1@d", "head:7:1@d", "head:7:1@e")
    RowSet([replace(row, metric="acc") for row in quality(variants)]).to_jsonl(folder / "eval.jsonl")
    result = run_main("table", str(folder))
    assert result.returncode == 0, result.stderr
    # head:7:1@d (0.920) against layer:3:1@d (0.940); head:7:1@e, whose run has no baseline, against layer:3:1
    assert "| 0.940 [0.875, 0.972] | 0.920 [0.850, 0.959] (-0.020) | 0.900 [0.826, 0.945] (-0.060) |" in result.stdout
    assert "(delta) against layer:3:1, layer:3:1@d" in result.stdout


def test_a_distillation_run_without_eval_rows_says_where_its_curves_are(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    row = {"variant": "head:3:1", "stage": 1, "step": 1, "tokens": 256, "loss": 1.5, "kind": "step", "status": "ok"}
    (folder / "train.jsonl").write_text(json.dumps(row) + "\n")
    result = run_main("table", str(folder))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{folder} holds only training rows (train.jsonl): see `hhbench report {folder}` for its curves"
    ]


def test_rows_with_a_host_time_show_it_beside_their_latency(rows):
    """host_ms (extra, eager CUDA rows) gets its own column right after the spread; rows without one leave it out."""
    timed = RowSet(replace(row, extra={**row.extra, "host_ms": 0.25}) for row in rows)
    text = compare_runs([Run("gpu", None, timed)]).to_markdown()
    header = next(line for line in text.splitlines() if "| latency_ms |" in line)
    assert "| latency_ms | p10-p90_ms | host_ms | speedup |" in header
    assert "| 0.25 |" in text
    assert "host_ms" not in compare_runs([Run("gpu", None, rows)]).to_markdown()


def test_a_row_issued_in_most_of_its_latency_is_noted_host_bound(rows):
    """floor-h200-v10's head 7:1 at 16K: issued in 1.77 ms for a 1.86 ms step (95%), its note says both why it looks
    slower than its FLOPs and that its time was the host's; a row issued in 89% of its time, or with no host time
    (null: a row file edited by hand), is not noted."""
    short = next(r for r in rows if r.variant == "head:7:1" and r.context == 1024 and r.pass_ == "prefill")
    others = [r for r in rows if r is not short]

    def note_with(host):
        timed = replace(short, extra={**short.extra, "host_ms": host})
        frame = compare_runs([Run("gpu", None, RowSet([*others, timed]))]).rows
        return single(frame, variant="head:7:1", context=1024, **{"pass": "prefill"})["note"]

    assert note_with(0.95 * short.latency_ms) == f"{DISAGREE_SLOWER}; host-bound"
    assert note_with(0.89 * short.latency_ms) == DISAGREE_SLOWER
    assert note_with(None) == DISAGREE_SLOWER


def test_the_tables_import_without_torch():
    """table, --targets and --kernels read rows only: importing torch (seconds on a CPU machine) is not theirs to pay
    (the host-bound reading, hhbench.tables.host, once came from measure.timing, which imports it)."""
    modules = "hhbench.tables.compare, hhbench.tables.targets, hhbench.tables.kernels"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
