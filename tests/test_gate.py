"""`hhbench gate`: regressions exit 1, a clean candidate 0, bad input 2 with one line."""

import json
import math
import os
import random
from dataclasses import replace

import pytest
from inprocess import run_main
from synthetic import analytic, measured, write_run

from hhbench.errors import UserError
from hhbench.gate.check import ALPHA, gate, least_p, parse_slowdown
from hhbench.rows.schema import ERROR, INCORRECT, OK, UNAVAILABLE, Row, RowSet, read_rows
from hhbench.rows.sources import describe


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


def noisy(rows: RowSet, factor: float, seed: int, count: int = 21, spread: float = 0.03, outliers: float = 0.0):
    """Every row's samples drawn afresh: median * factor * lognormal(spread), a fraction `outliers` of them twice
    as slow (a shared CPU's interruptions); median and p10/p90 recomputed from them."""
    rng = random.Random(seed)
    out = RowSet()
    for row in rows:
        base = latency_of(row) * factor
        samples = [base * rng.lognormvariate(0, spread) * (2 if rng.random() < outliers else 1) for _ in range(count)]
        ordered = sorted(samples)
        out.append(replace(row, samples_ms=samples, reps=count, latency_ms=ordered[count // 2],
                           latency_p10_ms=ordered[count // 10], latency_p90_ms=ordered[-1 - count // 10]))  # fmt: skip
    return out


def latency_of(row) -> float:
    from synthetic import latency_ms

    return latency_ms(row)


def with_outliers(rows: RowSet, every: int = 5) -> RowSet:
    """Every `every`-th sample twice as slow (a shared CPU's interruptions); p90 recomputed from the samples."""
    out = RowSet()
    for row in rows:
        samples = [2 * s if i % every == every - 1 else s for i, s in enumerate(row.samples_ms)]
        out.append(replace(row, samples_ms=samples, latency_p90_ms=sorted(samples)[-1 - len(samples) // 10]))
    return out


def test_fifteen_percent_slower_fails_even_where_outliers_make_the_bands_overlap(rows):
    # the miss: medians 15% slower, p10-p90 bands overlapping (every fifth sample a 2x outlier)
    base = with_outliers(rows)
    candidate = scaled(base, 1.15)
    assert all(new.latency_p10_ms < old.latency_p90_ms for old, new in zip(base, candidate, strict=True))
    report = gate(base, candidate)
    assert len(report.failures) == len(rows) and {f.check for f in report.failures} == {"latency"}
    assert report.failures[0].detail.startswith("slower +15.0% median; Mann-Whitney U p=")
    # and drawn at random with 3% noise, 21 samples a run: every row
    assert len(gate(noisy(rows, 1.0, seed=1), noisy(rows, 1.15, seed=2)).failures) == len(rows)


def test_runs_of_one_distribution_pass(rows):
    # twenty pairs of runs drawn from one distribution, with and without outliers: no false alarm
    for seed in range(20):
        for outliers in (0.0, 0.3):
            report = gate(
                noisy(rows, 1.0, 2 * seed, outliers=outliers), noisy(rows, 1.0, 2 * seed + 1, outliers=outliers)
            )
            assert report.passed and not report.improvements, report.to_markdown()


def test_a_significant_shift_below_the_minimum_effect_passes(rows):
    base, candidate = noisy(rows, 1.0, seed=3, spread=0.002), noisy(rows, 1.03, seed=4, spread=0.002)
    assert gate(base, candidate, max_slowdown=0.05).passed
    assert len(gate(base, candidate, max_slowdown=0.02).failures) == len(rows)


def test_a_ten_percent_shift_inside_wide_noise_passes(rows):
    base, candidate = noisy(rows, 1.0, seed=5, spread=0.3), noisy(rows, 1.10, seed=6, spread=0.3)
    assert gate(base, candidate).passed
    # the same shift with little noise is found
    assert len(gate(noisy(rows, 1.0, seed=5), noisy(rows, 1.10, seed=6)).failures) == len(rows)


def test_rows_with_too_few_samples_are_listed_not_tested(rows):
    few = RowSet(replace(row, samples_ms=row.samples_ms[:3]) for row in rows)
    report = gate(few, scaled(few, 1.5))
    assert report.passed and len(report.latency_untested) == len(rows)
    assert report.latency_untested[0].endswith("(3 and 3 samples)")
    assert f"## Latency not tested (too few samples to reach the test's p) ({len(rows)})" in report.to_markdown()
    # one sample too few where many rows share the test's p; enough once the rows tested are few
    assert least_p(5, 5) == pytest.approx(1 / 252)
    one = RowSet([few[0]])
    assert not gate(one, scaled(one, 1.5)).passed if least_p(3, 3) < ALPHA else gate(one, scaled(one, 1.5)).passed


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


def test_update_refuses_a_candidate_with_one_configuration_twice(tmp_path, rows):
    """A missing baseline was written from the candidate unchecked, two rows of one configuration and all, that every
    later gate against it then refused."""
    twice = write_run(tmp_path / "twice", RowSet([*rows, rows[0]]))
    result = run_main("gate", str(tmp_path / "new-baseline"), str(twice), "--update")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{twice} has two rows for one configuration: {describe(rows[0])}" in result.stderr
    assert not (tmp_path / "new-baseline").exists()


@pytest.mark.parametrize("flat", [False, True], ids=["folder", "jsonl"])
def test_update_replaces_the_baseline_whole(tmp_path, rows, monkeypatch, flat):
    """--update writes the new rows to a temporary file beside the baseline, fsyncs it and renames it over the old
    one: a write that stops after some rows (a kill, a full disk) leaves the old baseline as it was, where rows.jsonl
    was rewritten in place and lost its rows."""
    cand = write_run(tmp_path / "candidate", scaled(rows, 1.2), env={"device": "cpu"})
    if flat:
        target = base = tmp_path / "baseline.jsonl"
        RowSet(rows).to_jsonl(base)
    else:
        base = write_run(tmp_path / "baseline", rows, env={"device": "cpu"})
        target = base / "rows.jsonl"
    before, names = target.read_bytes(), sorted(p.name for p in target.parent.iterdir())
    written, to_dict = [], Row.to_dict

    def disk_full_after_three_rows(row):
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        written.append(row)
        return to_dict(row)

    monkeypatch.setattr(Row, "to_dict", disk_full_after_three_rows)
    with pytest.raises(OSError, match="No space left"):
        run_main("gate", str(base), str(cand), "--update")
    assert len(written) == 3 and target.read_bytes() == before  # failed mid-write, the old rows intact
    assert sorted(p.name for p in target.parent.iterdir()) == names  # and no temporary left behind
    monkeypatch.setattr(Row, "to_dict", to_dict)
    calls = []
    for name in ("fsync", "replace"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    assert run_main("gate", str(base), str(cand), "--update").returncode == 0
    assert read_rows(target) == scaled(rows, 1.2) and calls.index("fsync") < calls.index("replace")
    assert sorted(p.name for p in target.parent.iterdir()) == names


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
    malformed = []
    for number, (name, value, message) in enumerate(
        [
            ("latency_ms", "slow", 'field latency_ms must be a finite number or null, got "slow"'),
            ("samples_ms", "fast", 'field samples_ms must be a list of finite numbers, got "fast"'),
            ("context", "1k", 'field context must be an integer, got "1k"'),
            ("samples_ms", [math.nan] * 3, "field samples_ms must be a list of finite numbers, got [NaN, NaN, NaN]"),
            ("samples_ms", ["a", "b", "c"], 'field samples_ms must be a list of finite numbers, got ["a", "b", "c"]'),
        ]
    ):
        path = tmp_path / f"malformed{number}.jsonl"
        lines = [json.dumps(row.to_dict()) for row in rows[:2]] + [json.dumps({**rows[2].to_dict(), name: value})]
        path.write_text("\n".join(lines) + "\n")
        malformed.append(([str(good), str(path)], f"malformed{number}.jsonl:3: {message}"))
    return [
        *malformed,
        ([str(tmp_path / "nowhere"), str(good)], "no run at"),
        ([str(old), str(good)], "row schema version 0 is not the supported version 2"),
        ([str(good), str(other)], "have no configuration in common"),
        ([str(garbled), str(good)], "garbled.jsonl:1: not a JSON row"),
        ([str(twice), str(good)], "has two rows for one configuration: tiny fa prefill model 256"),
        ([str(good), str(good), "--metrics", "flops,speed"], "bad --metrics 'flops,speed'"),
        ([str(good), str(good), "--max-slowdown", "5"], "bad --max-slowdown '5'"),
        ([str(good), str(good), "--max-slowdown", "fast"], "bad --max-slowdown 'fast'"),
        # NaN compares false with every slowdown, so the latency check never failed; inf% likewise
        ([str(good), str(good), "--max-slowdown", "nan"], "bad --max-slowdown 'nan'"),
        ([str(good), str(good), "--max-slowdown", "inf%"], "bad --max-slowdown 'inf%'"),
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


def test_gate_rates_script_counts_false_alarms_and_detections(tmp_path, rows):
    import subprocess
    import sys

    from tests.conftest import ROOT

    runs = [write_run(tmp_path / f"r{seed}", noisy(rows, 1.0, seed)) for seed in range(3)]
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gate_rates.py"), *map(str, runs)],
                            capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    tested = 6 * len(rows)
    assert f"false alarms: 0/6 pairs, 0/{tested} rows (0%)" in result.stdout
    assert f"x1.15 detected across runs: {tested}/{tested} rows (100%); within a run: {len(rows) * 3}/" in result.stdout


def test_an_eval_row_reads_lm_evals_nan_stderr_as_none_but_refuses_a_nan_value(tmp_path):
    from hhbench.rows.schema import EvalRow

    row = EvalRow("tiny", "teacher", "passkey", 1024, "exact_match", value=1.0, stderr=math.nan, samples=1)
    path = tmp_path / "eval.jsonl"
    RowSet([row]).to_jsonl(path)
    assert read_rows(path, kind=EvalRow)[0].stderr is None
    RowSet([replace(row, value=math.nan)]).to_jsonl(path)
    with pytest.raises(UserError, match=r"eval.jsonl:1: field value must be a finite number or null, got NaN"):
        read_rows(path, kind=EvalRow)
