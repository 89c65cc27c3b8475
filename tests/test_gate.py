"""`hhbench gate`: regressions exit 1, a clean candidate 0, bad input 2 with one line."""

import json
from dataclasses import replace

import pytest
from inprocess import run_main
from synthetic import analytic, measured, write_run

from hhbench.gate.check import describe, gate, noise_band, parse_slowdown
from hhbench.rows.schema import ERROR, INCORRECT, OK, UNAVAILABLE, RowSet, read_rows


@pytest.fixture(scope="module")
def rows() -> RowSet:
    return measured(analytic(contexts=[256, 1024]))


def scaled(rows: RowSet, factor: float, spread: float | None = None, which=lambda row: True) -> RowSet:
    """Every chosen row `factor` times slower; with `spread`, its p10-p90 band at median -/+ spread."""
    out = RowSet()
    for row in rows:
        if not which(row):
            out.append(row)
            continue
        median = row.latency_ms * factor
        low, high = (row.latency_p10_ms * factor, row.latency_p90_ms * factor)
        if spread is not None:
            low, high = median * (1 - spread), median * (1 + spread)
        out.append(replace(row, latency_ms=median, latency_p10_ms=low, latency_p90_ms=high,
                           samples_ms=[s * factor for s in row.samples_ms]))  # fmt: skip
    return out


def gate_cli(run, tmp_path, baseline: RowSet, candidate: RowSet, *args: str):
    """The gate between two runs written to disk, through `run`: cli (a subprocess) or run_main (in process)."""
    base = write_run(tmp_path / "baseline", baseline, env={"device": "cpu"})
    cand = write_run(tmp_path / "candidate", candidate, env={"device": "cpu"})
    return run("gate", str(base), str(cand), *args)


def test_twenty_percent_slower_fails(cli, tmp_path, rows):
    result = gate_cli(cli, tmp_path, rows, scaled(rows, 1.20))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"FAIL ({len(rows)} regressions)" in result.stdout
    assert "| latency | tiny head:7:1 prefill model 1k b1 fp32 sdpa/reference |" in result.stdout
    assert "slower +20.0% median" in result.stdout


def test_two_percent_slower_passes(tmp_path, rows):
    result = gate_cli(run_main, tmp_path, rows, scaled(rows, 1.02, spread=0.001))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[2].startswith(f"PASS: {len(rows)} rows compared")


def test_ten_percent_slower_inside_a_wider_noise_band_passes(tmp_path, rows):
    noisy_base = scaled(rows, 1.0, spread=0.10)
    result = gate_cli(run_main, tmp_path, noisy_base, scaled(rows, 1.10, spread=0.10))
    assert result.returncode == 0, result.stdout + result.stderr
    # the same 10% with tight bands is a regression: the band, not the threshold, let it pass
    result = gate_cli(run_main, tmp_path, scaled(rows, 1.0, spread=0.01), scaled(rows, 1.10, spread=0.01))
    assert result.returncode == 1


def test_threshold_is_an_option(tmp_path, rows):
    candidate = scaled(rows, 1.20)
    assert not gate(rows, candidate, max_slowdown=0.05).passed
    assert gate(rows, candidate, max_slowdown=0.25).passed


def test_changed_flops_value_fails_and_names_the_row(tmp_path, rows):
    target = next(row for row in rows if row.variant == "head:7:1" and row.context == 1024 and row.pass_ == "decode")
    candidate = RowSet(replace(row, flops_fa_core=row.flops_fa_core + 1) if row is target else row for row in rows)
    result = gate_cli(run_main, tmp_path, rows, candidate, "--metrics", "flops,memory,presence,status")
    assert result.returncode == 1
    assert "FAIL (1 regression)" in result.stdout and "cost model changed" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith("| flops |"))
    assert "| tiny head:7:1 decode model 1k b1 fp32 sdpa/reference |" in line
    assert f"flops_fa_core {target.flops_fa_core!r} -> {target.flops_fa_core + 1!r}" in line


def test_changed_memory_value_fails(rows):
    candidate = RowSet(replace(row, kv_cache_bytes=row.kv_cache_bytes * 2) for row in rows)
    report = gate(rows, candidate)
    assert {f.check for f in report.failures} == {"memory"}
    assert not gate(rows, candidate, metrics=["flops", "latency"]).failures


def test_missing_row_fails_and_new_rows_are_listed(tmp_path, rows):
    extra = replace(rows[0], context=8192)
    result = gate_cli(run_main, tmp_path, rows, RowSet([*rows[1:], extra]))
    assert result.returncode == 1
    assert "| presence | tiny fa prefill model 256 b1 fp32 sdpa |" in result.stdout
    assert "## New rows (not in the baseline) (1)" in result.stdout and "- tiny fa prefill model 8k" in result.stdout
    # not gating presence still lists what is missing
    report = gate(rows, RowSet(rows[1:]), metrics=["flops"])
    assert report.passed and report.missing_not_gated == ["tiny fa prefill model 256 b1 fp32 sdpa"]


def test_improvements_are_listed(rows):
    report = gate(rows, scaled(rows, 0.7))
    assert report.passed and len(report.improvements) == len(rows)
    assert report.improvements[0].detail.startswith("faster -30.0% median")


def test_status_changes(rows):
    statuses = {0: ERROR, 1: INCORRECT, 2: OK, 3: INCORRECT}
    base = RowSet(replace(row, status={2: UNAVAILABLE, 3: INCORRECT}.get(i, row.status)) for i, row in enumerate(rows))
    candidate = RowSet(replace(row, status=statuses.get(i, row.status)) for i, row in enumerate(rows))
    report = gate(base, candidate)
    assert [(f.baseline, f.candidate) for f in report.failures] == [(OK, ERROR), (OK, INCORRECT)]
    assert [(f.baseline, f.candidate) for f in report.improvements] == [(UNAVAILABLE, OK)]
    assert [f.row for f in report.still_incorrect] == [describe(rows[3])]
    assert "## Still incorrect, as in the baseline (1)" in report.to_markdown()


def test_noise_band_from_samples_when_no_percentiles(rows):
    row = replace(rows[0], latency_p10_ms=None, latency_p90_ms=None, samples_ms=[1.0, 2.0, 3.0, 4.0, 5.0])
    assert noise_band(row) == pytest.approx((1.4, 4.6))
    assert noise_band(replace(row, samples_ms=[])) == (row.latency_ms, row.latency_ms)


def test_analytic_runs_gate_on_the_cost_model(tmp_path):
    rows = analytic(contexts=[512, 2048])
    base = write_run(tmp_path / "flops", rows)
    assert run_main("gate", str(base / "rows.jsonl"), str(base)).returncode == 0
    changed = RowSet(
        replace(row, state_bytes=row.state_bytes + 4) if row.variant == "head:7:1" else row for row in rows
    )
    result = run_main("gate", str(base), str(write_run(tmp_path / "changed", changed)))
    assert result.returncode == 1 and result.stdout.count("| memory | tiny head:7:1") == 4


def test_json_report_and_update(tmp_path, rows):
    slower = scaled(rows, 1.2)
    out = tmp_path / "gate.json"
    result = gate_cli(run_main, tmp_path, rows, slower, "--json", str(out), "--update")
    assert result.returncode == 0, result.stderr  # --update accepts the candidate on purpose
    report = json.loads(out.read_text())
    assert report["passed"] is False and len(report["failures"]) == len(rows)
    assert report["failures"][0]["candidate"] == pytest.approx(rows[0].latency_ms * 1.2)
    assert read_rows(tmp_path / "baseline" / "rows.jsonl") == slower
    assert run_main("gate", str(tmp_path / "baseline"), str(tmp_path / "candidate")).returncode == 0


def test_update_creates_a_missing_baseline(tmp_path, rows):
    cand = write_run(tmp_path / "candidate", rows, env={"device": "cpu"})
    result = run_main("gate", str(tmp_path / "new-baseline"), str(cand), "--update")
    assert result.returncode == 0, result.stderr
    assert read_rows(tmp_path / "new-baseline" / "rows.jsonl") == rows
    assert json.loads((tmp_path / "new-baseline" / "env.json").read_text()) == {"device": "cpu"}
    # a JSON-lines baseline is replaced by the candidate's rows
    flat = tmp_path / "flat.jsonl"
    RowSet(rows[:3]).to_jsonl(flat)
    result = run_main("gate", str(flat), str(cand), "--update")
    assert result.returncode == 0 and read_rows(flat) == rows


def test_slowdown_parsing():
    assert parse_slowdown("5%") == pytest.approx(0.05) and parse_slowdown("0.1") == pytest.approx(0.1)


def _bad_inputs(tmp_path, rows):
    good = write_run(tmp_path / "good", rows)
    old = tmp_path / "old"
    old.mkdir()
    (old / "rows.jsonl").write_text(json.dumps({**rows[0].to_dict(), "schema": 0}) + "\n")
    other = write_run(tmp_path / "other", RowSet(replace(row, model="other") for row in rows))
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text("{not json\n")
    twice = write_run(tmp_path / "twice", RowSet([rows[0], rows[0]]))
    return [
        ([str(tmp_path / "nowhere"), str(good)], "no run at"),
        ([str(old), str(good)], "row schema version 0 is not the supported version 1"),
        ([str(good), str(other)], "have no configuration in common"),
        ([str(garbled), str(good)], "garbled.jsonl:1: not a JSON row"),
        ([str(twice), str(good)], "has two rows for one configuration: tiny fa prefill model 256"),
        ([str(good), str(good), "--metrics", "flops,speed"], "bad --metrics 'flops,speed'"),
        ([str(good), str(good), "--max-slowdown", "5"], "bad --max-slowdown '5'"),
        ([str(good), str(good), "--max-slowdown", "fast"], "bad --max-slowdown 'fast'"),
    ]


def test_bad_input_exits_2_with_one_line(cli, tmp_path, rows):
    cases = _bad_inputs(tmp_path, rows)
    for args, message in cases:
        result = run_main("gate", *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr, (message, result.stderr)
        assert result.stdout == ""
    # and once through the real entry point
    args, message = cases[1]
    result = cli("gate", *args)
    assert result.returncode == 2 and result.stderr == f"hhbench: error: {result.stderr.split(': ', 2)[2]}"
    assert message in result.stderr and result.stderr.count("\n") == 1
