"""`hhbench sweep` on the CPU: the suite end to end, crash safety and resume, failures kept on rows, bad input."""

import dataclasses
import gc
import json
import os
import pickle
import runpy
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from inprocess import run_main

from hhbench.bench.floor import floor_layers, floor_parts
from hhbench.errors import UserError
from hhbench.measure.timing import TimingPolicy, time_callable
from hhbench.plan.grid import grid_points, load_suite
from hhbench.rows.runs import RunDir
from hhbench.rows.schema import Row, read_rows
from hhbench.runner import measurements
from hhbench.runner import sweep as sweep_module
from tests.conftest import ROOT

SMALL = ["--models", "tiny", "--layouts", "head,layer", "--ratios", "3:1", "--contexts", "64,128",
         "--passes", "prefill,decode", "--scopes", "kernel,layer", "--target-ms", "2", "--min-reps", "2",
         "--warmup-ms", "1"]  # fmt: skip
FAST = TimingPolicy(warmup_ms=1, target_ms=2, min_reps=2, max_reps=3)


def rows_of(path):
    return [json.loads(line) for line in (path / "rows.jsonl").read_text().splitlines()]


def test_cpu_suite_end_to_end(cli, tmp_path):
    result = cli("sweep", "--out", str(tmp_path), "--run", "cpu", timeout=600)
    assert result.returncode == 0, result.stderr
    rows = rows_of(tmp_path / "cpu")
    assert len(rows) == len(load_suite("cpu", "cpu").points) == 60
    assert {r["status"] for r in rows} == {"ok"}
    for row in rows:
        assert row["latency_p10_ms"] <= row["latency_ms"] <= row["latency_p90_ms"]
        assert row["max_rel_err"] < 1e-4 and row["timer"] == "perf_counter" and row["flops_total"] > 0
    env = json.loads((tmp_path / "cpu" / "env.json").read_text())
    assert env["device"].startswith("cpu") and env["versions"]["torch"] and env["suite"] == "cpu"
    assert "| head:3:1 |" in result.stdout and "60 new rows" in result.stdout
    # the main job says what it chose and why, and the table's rates carry their unit
    assert "no --suite given: suite 'cpu' (no CUDA GPU is visible" in result.stderr
    assert "| TFLOP/s |" in result.stdout and "tflops" not in result.stdout


def test_killed_sweep_resumes_to_the_same_rows(cli, tmp_path):
    whole = cli("sweep", *SMALL, "--out", str(tmp_path), "--run", "whole")
    assert whole.returncode == 0, whole.stderr
    expected = sorted(
        tuple(map(str, (r["variant"], r["pass"], r["scope"], r["context"]))) for r in rows_of(tmp_path / "whole")
    )
    assert len(expected) == 16

    rows_file = tmp_path / "killed" / "rows.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "hhbench", "sweep", *SMALL, "--out", str(tmp_path), "--run", "killed"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and (not rows_file.exists() or len(rows_file.read_text().splitlines()) < 5):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = rows_file.read_text().splitlines()
    assert 5 <= len(partial) < 16, "the kill must land midway"

    resumed = cli("sweep", *SMALL, "--out", str(tmp_path), "--run", "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert "already in" in resumed.stdout
    got = sorted(
        tuple(map(str, (r["variant"], r["pass"], r["scope"], r["context"]))) for r in rows_of(tmp_path / "killed")
    )
    assert got == expected, "exactly the rows of the uninterrupted sweep, none lost, none twice"


def test_half_written_last_line_is_repaired(tmp_path):
    run = RunDir(tmp_path / "r")
    points = grid_points({"models": "tiny", "layouts": "fa", "contexts": "32,64", "passes": "prefill"}, "cpu")
    sweep_module.run_sweep(points[:1], run, torch.device("cpu"), FAST)
    with open(run.rows_path, "a") as handle:
        handle.write('{"model": "tiny", "variant"')  # a kill in the middle of a write
    result = sweep_module.run_sweep(points, run, torch.device("cpu"), FAST)
    assert result.new == 1 and result.skipped == 1
    assert [r.context for r in read_rows(run.rows_path)] == [32, 64]


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path):
    """A last line that is a whole row lacking only its newline (a file written by hand or by another tool) is a
    finished row: read, skipped by a resumed sweep and given its newline, not dropped as half-written and cut from
    the file (the table lost it, and a resumed sweep measured it again)."""
    run = RunDir(tmp_path / "r")
    points = grid_points({"models": "tiny", "layouts": "fa", "contexts": "32,64", "passes": "prefill"}, "cpu")
    sweep_module.run_sweep(points[:1], run, torch.device("cpu"), FAST)
    text = run.rows_path.read_text()
    run.rows_path.write_text(text.removesuffix("\n"))
    assert [r.context for r in read_rows(run.rows_path)] == [32]
    result = sweep_module.run_sweep(points, run, torch.device("cpu"), FAST)
    assert result.new == 1 and result.skipped == 1
    assert run.rows_path.read_text().startswith(text)
    assert [r.context for r in read_rows(run.rows_path)] == [32, 64]


def test_a_sweeps_collections_walk_only_what_its_points_made(tmp_path, monkeypatch):
    """Trial.free's full collections (two to four a point) ran over the whole heap, torch's and hhbench's modules
    included: half the CPU suite's time. Within a sweep what was alive on entry is frozen out of the collector, the
    caller's garbage collected first (none frozen), and on exit nothing stays frozen."""
    gc.unfreeze()  # the tests' own freeze (conftest) is theirs to keep: a sweep inside it leaves it alone
    seen = []
    real_free = measurements.Trial.free
    monkeypatch.setattr(
        measurements.Trial, "free", lambda trial: seen.append(gc.get_freeze_count()) or real_free(trial)
    )
    cycle = [torch.zeros(1)]
    cycle.append(cycle)  # garbage only a collection frees
    dropped = weakref.ref(cycle[0])
    del cycle
    points = grid_points({"models": "tiny", "layouts": "fa", "contexts": "32", "passes": "prefill"}, "cpu")
    sweep_module.run_sweep(points, RunDir(tmp_path / "r"), torch.device("cpu"), FAST)
    assert seen and all(seen) and dropped() is None
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller's freeze is kept as it is: neither added to nor undone
    frozen = gc.get_freeze_count()
    sweep_module.run_sweep(points, RunDir(tmp_path / "s"), torch.device("cpu"), FAST)
    assert 0 < gc.get_freeze_count() <= frozen  # (frozen objects that die leave it)


def test_oom_and_errors_stay_on_their_rows_and_the_sweep_goes_on(tmp_path, monkeypatch):
    points = grid_points({"models": "tiny", "layouts": "head", "ratios": "1:1,3:1,7:1,15:1", "contexts": "32",
                          "passes": "prefill"}, "cpu")  # fmt: skip
    real_build = measurements.workloads.build

    def faulty_build(point, *args, **kwargs):
        if point.ratio == "3:1" and kwargs.get("reference") is None and len(args) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        if point.ratio == "7:1" and len(args) == 1:
            raise RuntimeError("an injected failure")
        return real_build(point, *args, **kwargs)

    monkeypatch.setattr(measurements.workloads, "build", faulty_build)
    result = sweep_module.run_sweep(points, RunDir(tmp_path / "r"), torch.device("cpu"), FAST)
    status = {row.ratio: (row.status, row.reason) for row in result.rows}
    assert status["1:1"][0] == "ok" and status["15:1"][0] == "ok"
    assert status["3:1"] == ("oom", "CUDA out of memory. Tried to allocate 80.00 GiB")
    assert status["7:1"][0] == "error" and "RuntimeError: an injected failure" in status["7:1"][1]
    assert len(read_rows(tmp_path / "r" / "rows.jsonl")) == 4
    retried = sweep_module.run_sweep(points, RunDir(tmp_path / "r"), torch.device("cpu"), FAST, retry=True)
    assert retried.new == 2 and len(read_rows(tmp_path / "r" / "rows.jsonl")) == 4


def test_asking_for_parts_measures_a_finished_point_again(tmp_path):
    spec = {"models": "tiny", "layouts": "head", "ratios": "3:1", "contexts": "32,64", "passes": "prefill"}
    run = RunDir(tmp_path / "r")
    first = sweep_module.run_sweep(grid_points(spec, "cpu"), run, torch.device("cpu"), FAST)
    assert first.new == 2 and not any("parts_ms" in row.extra for row in first.rows)
    assert all(row.extra["point_s"] > 0 for row in first.rows)  # what each point cost the sweep, in seconds
    with_parts = grid_points({**spec, "contexts": "64", "parts": True}, "cpu")
    second = sweep_module.run_sweep(with_parts, run, torch.device("cpu"), FAST)
    assert second.new == 1 and second.skipped == 0
    rows = read_rows(run.rows_path)
    assert len(rows) == 2 and len({row.key for row in rows}) == 2
    assert {row.context: set(row.extra.get("parts_ms", {})) for row in rows} == {32: set(), 64: {"fa", "gdn"}}
    again = sweep_module.run_sweep(with_parts, run, torch.device("cpu"), FAST)
    assert again.new == 0 and again.skipped == 1


def test_a_resumed_sweep_skips_a_point_whatever_spelling_of_its_ratio_asks(cli, tmp_path):
    tiny = ["--models", "tiny", "--layouts", "head,layer", "--contexts", "256", "--passes", "prefill", "--scopes",
            "kernel", "--target-ms", "1", "--min-reps", "2", "--warmup-ms", "1", "--out", str(tmp_path), "--run", "dd"]  # fmt: skip
    first = cli("sweep", "--ratios", "6:2", *tiny)
    assert first.returncode == 0 and "2 new rows" in first.stdout, first.stderr
    again = cli("sweep", "--ratios", "3:1,9:3", *tiny)
    assert again.returncode == 0 and "0 new rows" in again.stdout, again.stdout + again.stderr
    rows = rows_of(tmp_path / "dd")
    assert sorted(row["variant"] for row in rows) == ["head:3:1", "layer:3:1"] and {r["ratio"] for r in rows} == {"6:2"}


def test_isolated_points(cli, tmp_path):
    result = cli("sweep", "--models", "tiny", "--layouts", "head", "--ratios", "3:1", "--contexts", "64",
                 "--passes", "prefill,decode", "--isolate", "--out", str(tmp_path), "--run", "iso", "--target-ms", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in rows_of(tmp_path / "iso")] == ["ok", "ok"]


def test_an_isolated_point_runs_with_the_sweeps_cpu_threads(tmp_path, monkeypatch, capsys):
    """--isolate --threads 1: the fresh process measures with one thread too (it took torch's default, and on a
    shared 2-core machine two threads made a 5 ms CPU layer read 184 ms)."""
    [point] = grid_points({"models": "tiny", "layouts": "head", "ratios": "3:1", "contexts": "32"}, "cpu")
    handed = []

    def child(command, **kwargs):  # the worker run here, on what the sweep hands it
        handed.append(pickle.loads(Path(command[-1]).read_bytes()))
        monkeypatch.setattr(sys, "argv", ["worker", command[-1]])
        runpy.run_module("hhbench.runner.worker", run_name="__main__")
        return subprocess.CompletedProcess(command, 0, capsys.readouterr().out, "")

    before = torch.get_num_threads()
    monkeypatch.setattr(sweep_module.subprocess, "run", child)
    try:
        torch.set_num_threads(1)
        row = sweep_module._measure_isolated(point, torch.device("cpu"), FAST, False)
        assert handed[0][-1] == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)  # the worker sets what it is handed, whatever this process has
        sweep_module._measure_isolated(point, torch.device("cpu"), FAST, False)
        assert handed[1][-1] == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert row.status == "ok"


def test_an_isolated_point_dying_inside_its_floor_keeps_its_latency(monkeypatch, capsys):
    """--isolate: a fresh process that dies inside an addition of the point it timed (the floor here, the profile's
    SIGSEGV on the H200) leaves the point's row, latency kept and the addition failed, as a launch's worker does."""
    [point] = grid_points({"models": "tiny", "layouts": "head", "ratios": "3:1", "contexts": "32", "scopes": "layer",
                           "floor": True}, "cpu")  # fmt: skip

    class Died(BaseException):  # escapes every `except Exception`, as a process's death ends it
        pass

    def dies(point, device):
        raise Died

    def child(command, **kwargs):  # the worker run here, dying where a SIGSEGV would end it
        monkeypatch.setattr(sys, "argv", ["worker", command[-1]])
        with pytest.raises(Died):
            runpy.run_module("hhbench.runner.worker", run_name="__main__")
        return subprocess.CompletedProcess(command, -11, capsys.readouterr().out, "")

    monkeypatch.setattr(measurements, "floor_parts", dies)
    monkeypatch.setattr(sweep_module.subprocess, "run", child)
    row = sweep_module._measure_isolated(point, torch.device("cpu"), FAST, False)
    assert row.status == "ok" and row.latency_ms > 0 and row.floor_ms is None, (row.status, row.reason)
    assert row.extra["floor_error"] == "isolated worker killed by SIGSEGV"
    assert sweep_module.ADDITION_RUNNING not in row.extra


def test_unavailable_backend_is_a_row_not_a_crash(tmp_path):
    points = grid_points({"models": "tiny", "layouts": "head", "ratios": "3:1", "contexts": "32"}, "cpu")
    gpu_point = points[0].__class__(**{**points[0].__dict__, "fa_backend": "sdpa-cudnn"})
    result = sweep_module.run_sweep([gpu_point], RunDir(tmp_path / "r"), torch.device("cpu"), FAST)
    row = result.rows[0]
    assert row.status == "unavailable" and "sdpa-cudnn" in row.reason


def test_resuming_on_another_machine_is_refused(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "env.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3"}))
    result = run_main("sweep", *SMALL, "--out", str(tmp_path), "--run", "r")
    assert result.returncode == 2 and "was measured on NVIDIA H100" in result.stderr
    assert result.stderr.count("\n") == 1


def test_timing_policy_bounds_the_samples():
    timing = time_callable(
        lambda: sum(range(1000)), torch.device("cpu"), TimingPolicy(warmup_ms=1, target_ms=5, min_reps=4, max_reps=7)
    )
    assert 4 <= len(timing.samples_ms) <= 7 and timing.timer == "perf_counter"
    assert timing.percentile(0.1) <= timing.median_ms <= timing.percentile(0.9)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ratios", "7-1"], "bad ratio '7-1'"),
        (["--fa-backend", "warp-drive"], "unknown FA backend 'warp-drive'"),
        (["--gdn-backend", "fla-chunk"], "backend fla-chunk needs cuda, and this run is on cpu"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--set", "n_heads=7"], "not a multiple of n_kv_heads"),
        (["--contexts", "4q"], "bad context '4q'"),
        (["--scopes", "galaxy"], "unknown scope 'galaxy'"),
        (["--mode", "parallel"], "unknown mode 'parallel'"),
        (
            ["--mode", "sequential,streams"],
            "mode streams runs the two backends on two CUDA streams, and this run is on cpu",
        ),
        (
            ["--crosscheck", "1"],
            "--crosscheck times points again with triton's do_bench on CUDA, and this run is on cpu",
        ),
        (["--crosscheck", "-1"], "--crosscheck must be >= 0"),
        (["--out", "/proc/version/x"], "/proc/version is a file, not a folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    base = ["--models", "tiny", "--ratios", "3:1", "--contexts", "32"]
    overridden = {a for a in args if a.startswith("--")}
    merged = [x for i, x in enumerate(base) if not (x in overridden or (i and base[i - 1] in overridden))]
    result = run_main("sweep", *merged, *args)
    assert result.returncode == 2, result.stdout
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("args,message", [(["--suite", "default"], "needs a GPU"), (["--suite", "nope"], "no suite 'nope'"),
                                          (["--suite", "cpu", "--ratios", "3:1"], "either --suite or grid flags")])  # fmt: skip
def test_bad_suites(args, message):
    result = run_main("sweep", *args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/tmp/abs"])
def test_a_run_name_that_is_no_folder_name_is_refused(tmp_path, name):
    """--run "" (a script's unset variable) was taken for no --run: the sweep went into the default run, SUITE-DEVICE,
    resuming whatever was there; the other names would leave --out."""
    out = tmp_path / "out"
    result = run_main("sweep", "--models", "tiny", "--layouts", "head", "--ratios", "3:1", "--contexts", "32", "--pass",
                      "prefill", "--scopes", "kernel", "--no-floor", "--run", name, "--out", str(out))  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"bad run name {name!r}: one folder name inside --out" in result.stderr
    assert not out.exists()


def _parts(point):
    return {(part.layer, part.name): (part.count, part.shape) for part in floor_parts(point, torch.device("cpu"))}


def test_the_floors_parts_are_the_points_parts():
    """tiny: hidden 64, 8 heads of 8, 4 KV heads, MLP 128, vocab 256, 4 layers; GDN heads add decay, beta and an
    output gate of 8 to the input projection (padded to a multiple of 64 rows: 128 + 6 x 10 -> 192, 128 + 8 x 10 ->
    256), and convolve their q, k and v (24 channels each)."""
    head, layer = grid_points({"models": "tiny", "layouts": "head,layer", "ratios": "3:1", "contexts": "64",
                               "scopes": "layer"}, "cpu")  # fmt: skip
    qkv = (8 + 2 * 4) * 8
    assert _parts(head) == {
        ("2 FA + 6 GDN heads", "in_proj"): (1, {"tokens": 64, "in": 64, "out": 192}),
        ("2 FA + 6 GDN heads", "conv"): (1, {"tokens": 64, "channels": 6 * 24, "size": 4}),
        ("2 FA + 6 GDN heads", "fa"): (1, {"heads": 2, "kv_heads": 2}),
        ("2 FA + 6 GDN heads", "gdn"): (1, {"heads": 6}),
        ("2 FA + 6 GDN heads", "o_proj"): (1, {"tokens": 64, "in": 64, "out": 64}),
    }
    assert _parts(layer) == {  # the timed unit: 3 GDN layers and one FA layer
        ("0 FA + 8 GDN heads", "in_proj"): (3, {"tokens": 64, "in": 64, "out": 256}),
        ("0 FA + 8 GDN heads", "conv"): (3, {"tokens": 64, "channels": 8 * 24, "size": 4}),
        ("0 FA + 8 GDN heads", "gdn"): (3, {"heads": 8}),
        ("0 FA + 8 GDN heads", "o_proj"): (3, {"tokens": 64, "in": 64, "out": 64}),
        ("8 FA + 0 GDN heads", "in_proj"): (1, {"tokens": 64, "in": 64, "out": qkv}),
        ("8 FA + 0 GDN heads", "fa"): (1, {"heads": 8, "kv_heads": 4}),
        ("8 FA + 0 GDN heads", "o_proj"): (1, {"tokens": 64, "in": 64, "out": 64}),
    }
    assert floor_layers(head) == 1 and floor_layers(layer) == 4
    model, decode = grid_points({"models": "tiny", "layouts": "layer", "ratios": "3:1", "contexts": "64",
                                 "scopes": ["model"], "passes": "prefill,decode", "batch": 2}, "cpu")  # fmt: skip
    parts = _parts(model)
    assert parts[("0 FA + 8 GDN heads", "mlp")] == (3, {"tokens": 128, "hidden": 64, "width": 128})
    assert parts[("8 FA + 0 GDN heads", "mlp")][0] == 1
    assert parts[("model", "lm_head")] == (1, {"tokens": 128, "in": 64, "out": 256})
    assert floor_layers(model) == 1
    steps = _parts(decode)  # one token per sequence against a cache of 64
    assert steps[("0 FA + 8 GDN heads", "in_proj")][1]["tokens"] == 2
    assert steps[("0 FA + 8 GDN heads", "conv")][1] == {"tokens": 2, "channels": 8 * 24, "size": 4}


def test_the_correctness_reference_runs_the_reference_glue_in_every_layer(monkeypatch):
    """check_correctness's fp32 reference takes the reference glue in every layer: on CUDA `auto` fuses a layer
    without GDN heads whatever the GDN backend, which would check a layer-wise point's FA layers against the fused
    path itself. Here `auto` stands for a glue that fuses every layer (on the CPU it fuses none)."""
    from hhbench.bench import workloads
    from hhbench.layers import glue
    from hhbench.layers.hydrahead import HydraAttention

    fused = []
    monkeypatch.setattr(HydraAttention, "_glue_ops",
                        lambda self, core, device: None if self.glue == "reference" else fused.append(self) or glue.TORCH)  # fmt: skip
    [point] = grid_points({"models": "tiny", "layouts": "layer", "ratios": "3:1", "contexts": "32",
                           "passes": "prefill", "scopes": "layer"}, "cpu")  # fmt: skip
    for reference, layers in ((False, 2), (True, 0)):  # the unit's distinct layers: a GDN layer and an FA layer
        fused.clear()
        workloads.build(point, torch.device("cpu"), reference=reference).outputs()
        assert len({id(layer) for layer in fused}) == layers


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_decode_points_reference_holds_the_same_caches(dtype):
    """The fp32 reference of a decode point starts from the very caches the point does, rounded: drawn in fp16 or
    bf16, torch's CPU normal_ gives other values than in fp32 for some sizes (tiny head 7:1's K cache, 520
    elements), so the check compared other inputs and called a right layer incorrect (relative error 0.86)."""
    points = grid_points({"models": "tiny", "layouts": "head", "ratios": "7:1", "contexts": "64", "passes": "decode",
                          "scopes": ["layer", "model"], "dtype": dtype}, "cpu")  # fmt: skip
    for point in points:
        assert measurements.check_correctness(point, torch.device("cpu")) <= measurements.TOLERANCE[dtype], point


def test_layer_and_model_rows_carry_their_floor(tmp_path, monkeypatch):
    points = grid_points({"models": "tiny", "layouts": "head,layer", "ratios": "3:1", "contexts": "32",
                          "passes": "prefill,train,decode", "scopes": ["kernel", "layer", "model"]}, "cpu")  # fmt: skip
    result = sweep_module.run_sweep(points, RunDir(tmp_path / "r"), torch.device("cpu"), FAST)
    rows = read_rows(tmp_path / "r" / "rows.jsonl")
    assert len(rows) == 18 and {row.status for row in rows} == {"ok"} and result.new == 18
    for row in rows:
        assert row.gdn_impl == "pure-torch " + ("recurrence, token by token: the oracle" if row.pass_ == "decode"
                                                else "chunked reference (hhbench.kernels.reference)")  # fmt: skip
        if row.scope == "kernel":
            assert row.floor_ms is None and "floor_parts_ms" not in row.extra
            continue
        parts = row.extra["floor_parts_ms"]
        total = sum(layer["count"] * sum(layer["parts_ms"].values()) for layer in parts.values())
        per = sum(layer["count"] for name, layer in parts.items() if name != "model") if row.scope == "layer" else 1
        ways = row.extra["floor_ways_ms"]  # the CPU times no graphs: the parts back to back, eagerly
        assert set(ways) == {"the parts' medians summed", "every part back to back, eagerly"}
        assert ways["the parts' medians summed"] == pytest.approx(total / per)
        assert row.floor_ms == min(ways.values()) and row.extra["floor_method"] == min(ways, key=ways.get)
        assert row.vs_floor == pytest.approx(row.latency_ms / row.floor_ms)
    # a floor that fails costs the row nothing but its floor
    monkeypatch.setattr(measurements, "floor_parts", lambda point, device: 1 / 0)
    again = sweep_module.run_sweep(points[:3], RunDir(tmp_path / "s"), torch.device("cpu"), FAST)
    broken = [row for row in again.rows if row.scope != "kernel"]
    assert broken and all(r.status == "ok" and r.floor_ms is None for r in broken)
    assert broken[0].extra["floor_error"].startswith("ZeroDivisionError: division by zero at ")


def test_no_floor_flag(cli, tmp_path):
    result = cli("sweep", "--models", "tiny", "--layouts", "head", "--ratios", "3:1", "--contexts", "32",
                 "--scopes", "layer", "--no-floor", "--out", str(tmp_path), "--run", "bare", "--target-ms", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    [row] = rows_of(tmp_path / "bare")
    assert row["status"] == "ok" and row["floor_ms"] is None and row["vs_floor"] is None
    env = json.loads((tmp_path / "bare" / "env.json").read_text())
    assert env["auto"]["gdn/prefill"] == ["torch-chunk"] and "flash-qla" in env["versions"]


def test_a_suite_asking_for_streams_on_the_cpu_is_refused(tmp_path):
    suite = tmp_path / "streams.toml"
    suite.write_text('name = "s"\n[[grid]]\nmodels = ["tiny"]\nlayouts = ["head"]\nmodes = ["streams"]\n')
    result = run_main("sweep", "--suite", str(suite), "--device", "cpu", "--out", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "mode streams runs the two backends on two CUDA streams, and this run is on cpu" in result.stderr
    assert not (tmp_path / "s-cpu").exists()


def test_a_suite_asking_for_cuda_graphs_on_the_cpu_is_refused(tmp_path):
    suite = tmp_path / "graphs.toml"
    suite.write_text('name = "g"\n[[grid]]\nmodels = ["tiny"]\nlayouts = ["head"]\n[timing]\ngraph = true\n')
    result = run_main("sweep", "--suite", str(suite), "--device", "cpu", "--out", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "[timing] graph = true captures CUDA graphs, and this run is on cpu" in result.stderr
    assert not (tmp_path / "g-cpu").exists()
    flag = run_main("sweep", "--models", "tiny", "--layouts", "head", "--device", "cpu", "--graph", "--out",
                    str(tmp_path))  # fmt: skip
    assert flag.returncode == 2 and flag.stderr.count("\n") == 1, flag.stderr
    assert "--graph captures CUDA graphs, and this run is on cpu" in flag.stderr
    # --no-graph overrides the suite's [timing] graph = true: the run then goes ahead on the CPU
    small = tmp_path / "small.toml"
    small.write_text('name = "s"\n[[grid]]\nmodels = ["tiny"]\nlayouts = ["fa"]\ncontexts = ["32"]\npasses = ["prefill"]\n'
                     'scopes = ["kernel"]\n[timing]\ngraph = true\ntarget_ms = 1\nmin_reps = 1\n')  # fmt: skip
    eager = run_main("sweep", "--suite", str(small), "--device", "cpu", "--no-graph", "--out", str(tmp_path))
    assert eager.returncode == 0, eager.stderr


def test_eager_and_graph_timed_rows_never_share_a_run(tmp_path):
    from hhbench.cli.sweep import default_run_name
    from hhbench.rows.schema import append_row
    from hhbench.runner.point import base_row

    # the row key does not hold the timer: a --graph sweep resuming the eager run would skip its points as measured
    assert default_run_name("s", torch.device("cpu"), graph=True) == "s-graph-cpu"
    assert default_run_name("s", torch.device("cpu")) == "s-cpu"
    run = RunDir(tmp_path / "r").create()
    grid = {"models": "tiny", "layouts": "head", "ratios": "3:1", "contexts": "32", "passes": "prefill,decode"}
    prefill, decode = grid_points({**grid, "scopes": "layer"}, "cuda")
    append_row(run.rows_path, dataclasses.replace(base_row(decode), timer="cuda-graph"))  # decode: always a graph
    sweep_module.check_timer(run, TimingPolicy(graph=False))
    append_row(run.rows_path, dataclasses.replace(base_row(prefill), timer="cuda-events"))
    sweep_module.check_timer(run, TimingPolicy(graph=False))
    with pytest.raises(UserError, match="timed its prefill and training steps eagerly, this sweep times them as CUDA"):
        sweep_module.check_timer(run, TimingPolicy(graph=True))
    graphs = RunDir(tmp_path / "g").create()
    append_row(graphs.rows_path, dataclasses.replace(base_row(prefill), timer="cuda-graph"))
    sweep_module.check_timer(graphs, TimingPolicy(graph=True))
    with pytest.raises(UserError, match="as CUDA graphs, this sweep times them eagerly"):
        sweep_module.check_timer(graphs, TimingPolicy(graph=False))


def test_a_measurement_is_one_registered_unit(monkeypatch):
    from hhbench.runner.point import measure_point

    assert list(measurements.MEASUREMENTS) == ["fit", "availability", "correctness", "timing", "host", "memory",
                                               "throughput", "parts", "crosscheck", "floor", "profile"]  # fmt: skip
    fields = {spec.name for spec in dataclasses.fields(Row)}
    for unit in measurements.MEASUREMENTS.values():
        assert all(name.startswith("extra.") or name in fields for name in unit.fields), unit.name
    with pytest.raises(ValueError, match="measurement 'timing' is registered twice"):
        measurements.measurement("timing", ())(lambda trial: None)
    # a new measurement: one unit, run after those before it, writing its own field
    probe = measurements.Measurement("probe", ("extra.probe",), lambda t: t.row.extra.update(probe=t.row.tflops))
    monkeypatch.setitem(measurements.MEASUREMENTS, "probe", probe)
    [point] = grid_points({"models": "tiny", "layouts": "head", "ratios": "3:1", "contexts": "32"}, "cpu")
    row = measure_point(point, torch.device("cpu"), FAST, {})
    assert row.status == "ok" and row.extra["probe"] == row.tflops > 0


def test_an_interrupt_is_one_line_and_exit_130(tmp_path, monkeypatch):
    """Typer turns a KeyboardInterrupt inside a command into exit code 130 by itself: the line must still come."""

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "measure_point", interrupt)
    result = run_main("sweep", "--models", "tiny", "--layouts", "fa", "--contexts", "32", "--passes", "prefill",
                      "--scopes", "kernel", "--out", str(tmp_path), "--run", "r")  # fmt: skip
    assert result.returncode == 130
    assert result.stderr.strip().splitlines()[-1] == "hhbench: interrupted; rerun the same command to resume"
    assert "Traceback" not in result.stderr


def test_the_docs_name_the_rows_schema_version():
    import re

    from hhbench.rows.schema import SCHEMA_VERSION

    said = re.findall(r"schema version (\d+)", (ROOT / "docs" / "sweep.md").read_text())
    assert said and {int(n) for n in said} == {SCHEMA_VERSION}


def test_a_point_above_the_available_memory_is_an_oom_row_not_a_run(tmp_path, monkeypatch):
    """Its analytic lower bound (kernel prefill: the cores' inputs and outputs, 33.5 MiB at 64k tokens of tiny's
    head:3:1) above the device's available memory (1 MiB here): not run, an oom row naming both; the sweep goes
    on to the point that fits (64 tokens)."""
    from hhbench.runner import measurements as measurements_module

    monkeypatch.setattr(measurements_module, "available_bytes", lambda device: 2.0**20)
    points = grid_points({"models": "tiny", "layouts": "head", "ratios": "3:1", "contexts": "64k,64",
                          "passes": "prefill", "scopes": ["kernel"]}, "cpu")  # fmt: skip
    result = sweep_module.run_sweep(points, RunDir(tmp_path / "r"), torch.device("cpu"), FAST)
    status = {row.context: (row.status, row.reason) for row in result.rows}
    assert status[65536] == (
        "oom", "not run: needs at least 0.0327 GiB (analytic lower bound), cpu has 0.000977 GiB available"
    )  # fmt: skip
    assert status[64][0] == "ok"


@pytest.mark.parametrize("graph", [True, False])
@pytest.mark.parametrize("one_graph_ms", [0.5, 1e6])
def test_a_floor_is_the_lower_of_its_two_timings(monkeypatch, one_graph_ms, graph):
    """The floor's parts are timed each alone and all back to back as one call (one CUDA graph where the point is
    timed as replays); the floor is the lower (a prefill's one graph read 8% above its parts summed on an H200;
    at 16K an eager prefill's parts summed read above their layer). The back-to-back time is set here (the CPU
    captures no graphs); the parts are measured."""
    from hhbench.measure.timing import Timing, TimingPolicy
    from hhbench.runner.point import base_row

    [point] = grid_points({"models": "tiny", "layouts": "head", "ratios": "3:1", "contexts": "32", "scopes": "layer",
                           "passes": "prefill"}, "cpu")  # fmt: skip
    row = base_row(point)
    row.status, row.latency_ms = "ok", 10.0
    parts = measurements.time_each
    monkeypatch.setattr(measurements, "time_each", lambda *args: {k: v + 1.0 for k, v in parts(*args).items()})
    timer = "cuda-graph" if graph else "cuda-events"
    monkeypatch.setattr(measurements, "time_callable", lambda *args: Timing([one_graph_ms], timer, 0.0, []))
    policy = TimingPolicy(target_ms=2, min_reps=2, graph=graph)
    measurements.MEASUREMENTS["floor"].run(measurements.Trial(point, torch.device("cpu"), policy, row, {}))
    ways = row.extra["floor_ways_ms"]
    together = "every part back to back, " + ("one CUDA graph" if graph else "eagerly")
    assert ways[together] == one_graph_ms and ways["the parts' medians summed"] > 5 and len(ways) == 2
    assert row.floor_ms == min(ways.values()) and row.vs_floor == pytest.approx(10.0 / row.floor_ms)
    assert row.extra["floor_method"] == min(ways, key=ways.get)
