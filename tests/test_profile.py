"""`sweep --profile` on the CPU: the step kernel by kernel (extra.kernels), the floor's share of its kernel time,
kept out of the timing, and `hhbench table --kernels`."""

import dataclasses
from pathlib import Path

import pytest
import torch
from inprocess import run_main

import hhbench
from hhbench.errors import UserError
from hhbench.layers.glue import causal_conv
from hhbench.measure.profile import kernel_kinds, profile_kernels
from hhbench.plan.grid import grid_points, load_suite
from hhbench.report.page import build_report
from hhbench.rows.runs import RunDir
from hhbench.rows.schema import markdown_table, read_rows
from hhbench.rows.sources import load_runs
from hhbench.runner import measurements
from hhbench.runner import sweep as sweep_module
from hhbench.runner.point import measure_point
from hhbench.tables.kernels import kernel_frame
from tests.test_sweep import FAST

CPU = torch.device("cpu")
CONV_SITE = f"hhbench/layers/glue.py:{causal_conv.__code__.co_firstlineno} causal_conv"  # where the GDN conv runs
TINY = {"models": "tiny", "layouts": "head,layer", "ratios": "3:1", "contexts": "64", "scopes": "layer"}


@pytest.fixture(scope="module")
def profiled():
    """Rows of the tiny head 3:1 layer in prefill and decode, layer 3:1 in decode and a kernel-scope decode, profiled
    (prefill through the CPU's chunked reference runs thousands of operators: one such row is enough)."""
    grid = {**TINY, "passes": "decode", "profile": True}
    points = [*grid_points({**grid, "layouts": "head", "passes": "prefill"}, "cpu"), *grid_points(grid, "cpu"),
              *grid_points({**grid, "scopes": "kernel"}, "cpu")[:1]]  # fmt: skip
    return [measure_point(point, CPU, FAST, {}) for point in points]


def test_a_profiled_step_lists_the_kernels_it_runs(profiled):
    for row in profiled:
        where = f"{row.variant} {row.pass_} {row.scope}"
        kernels = row.extra["kernels"]
        assert row.status == "ok" and "profile_error" not in row.extra, where
        assert kernels["activity"] == "cpu" and kernels["steps"] == measurements.PROFILE_STEPS
        listed = kernels["top"]
        assert len(listed) == measurements.PROFILE_TOP and kernels["other"]["kernels"] > 0, where
        assert [k["ms"] for k in listed] == sorted((k["ms"] for k in listed), reverse=True), where
        assert all(k["ms"] > 0 and k["launches"] > 0 for k in listed), where
        total = sum(k["ms"] for k in listed) + kernels["other"]["ms"]
        assert total == pytest.approx(kernels["kernel_ms"]), where
        # per step, the kernels' times fit in the step that ran them (self times: nested operators count once)
        assert 0 < kernels["kernel_ms"] <= kernels["step_ms"], where
        # the layer's projections are matrix products: one of the longest operators on these small shapes
        if row.scope == "layer":
            assert {"aten::mm", "aten::addmm", "aten::bmm"} & {k["name"] for k in listed}, where
        assert "note" not in kernels  # the CPU times no CUDA graph


def test_layer_rows_split_their_kernel_time_by_the_floors_parts(profiled):
    for row in profiled:
        where = f"{row.variant} {row.pass_} {row.scope}"
        if row.scope == "kernel":  # the cores alone: no floor to attribute against
            assert "kernel_shares" not in row.extra and "kind" not in row.extra["kernels"]["top"][0], where
            continue
        shares = row.extra["kernel_shares"]
        assert set(shares) == {"floor", "shared", "rest"} and sum(shares.values()) == pytest.approx(1), where
        for kernel in row.extra["kernels"]["top"]:
            assert kernel["kind"] in shares and (kernel["kind"] == "rest") == (not kernel["parts"]), where
            assert set(kernel["parts"]) <= {"in_proj", "conv", "fa", "gdn", "o_proj"}, where
        matmul = next(k for k in row.extra["kernels"]["top"] if k["name"] == "aten::mm")
        assert {"in_proj", "o_proj"} <= set(matmul["parts"]), where


def test_kernel_kinds_by_the_launches_of_the_floors_parts():
    launches = {"gemm": 2.0, "copy": 5.0, "norm": 1.0, "conv": 0.75}
    floor = {"gemm": 2.0, "copy": 1.0, "conv": 0.75, "unused": 3.0}
    assert kernel_kinds(launches, floor) == {"gemm": "floor", "copy": "shared", "norm": "rest", "conv": "floor"}


def test_a_flush_before_each_call_is_not_profiled():
    x = torch.randn(32, 32)
    found = profile_kernels(lambda: x @ x, CPU, 3, before=lambda: torch.randn(64).exp())
    assert found.launches["aten::mm"] == 3 and "aten::exp" not in found.ms and "aten::randn" not in found.ms


def test_the_profile_runs_after_everything_timed(monkeypatch):
    """The profiler never runs while the point (or its floor) is timed: its overhead stays out of every latency."""
    calls = []
    for name in ("time_callable", "time_each", "profile_kernels"):
        original = getattr(measurements, name)
        monkeypatch.setattr(measurements, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    assert measurements.MEASUREMENTS["profile"].addition
    [point] = grid_points({**TINY, "layouts": "head", "passes": "decode", "profile": True}, "cpu")
    row = measure_point(point, CPU, FAST, {})
    assert row.status == "ok" and row.floor_ms and "kernels" in row.extra
    first = calls.index("profile_kernels")
    assert "time_callable" in calls[:first] and not {"time_callable", "time_each"} & set(calls[first:])


def test_a_failed_profile_costs_the_row_only_its_profile(monkeypatch):
    monkeypatch.setattr(measurements, "profile_kernels", lambda *args, **kwargs: 1 / 0)
    [point] = grid_points({**TINY, "layouts": "head", "profile": True}, "cpu")
    row = measure_point(point, CPU, FAST, {})
    assert row.status == "ok" and row.latency_ms > 0 and row.floor_ms > 0
    assert "kernels" not in row.extra and row.extra["profile_error"].startswith("ZeroDivisionError")


def test_asking_for_the_profile_profiles_a_finished_row(tmp_path):
    [point] = grid_points({**TINY, "layouts": "head", "passes": "decode", "floor": False}, "cpu")
    run = RunDir(tmp_path / "r")
    first = sweep_module.run_sweep([point], run, CPU, FAST)
    assert first.new == 1 and "kernels" not in first.rows[0].extra  # off by default
    profiled = dataclasses.replace(point, profile=True)
    second = sweep_module.run_sweep([profiled], run, CPU, FAST)
    assert (second.new, second.completed, second.skipped) == (0, 1, 0)
    [row] = read_rows(run.rows_path)
    assert "kernels" in row.extra and row.samples_ms == first.rows[0].samples_ms  # the row's timing kept
    assert sweep_module.run_sweep([profiled], run, CPU, FAST).completed == 0


@pytest.mark.parametrize("isolate", [False, True])
def test_retry_errors_measures_a_failed_profile_and_floor_again_on_the_finished_row(tmp_path, monkeypatch, isolate):
    """`sweep --retry-errors` takes a profile and a floor that failed again (they were never retried: a row holding
    profile_error counted as profiled), on the finished row, which keeps its latency; without it they stay."""
    [point] = grid_points({**TINY, "layouts": "head", "passes": "decode", "profile": True}, "cpu")
    run = RunDir(tmp_path / "r")
    for name in ("profile_kernels", "floor_parts"):
        monkeypatch.setattr(measurements, name, lambda *args, **kwargs: 1 / 0)
    [failed] = sweep_module.run_sweep([point], run, CPU, FAST).rows
    assert failed.status == "ok" and {"profile_error", "floor_error"} <= failed.extra.keys()
    monkeypatch.undo()
    kept = sweep_module.run_sweep([point], run, CPU, FAST)
    assert (kept.new, kept.completed, kept.skipped) == (0, 0, 1) and read_rows(run.rows_path) == [failed]
    retried = sweep_module.run_sweep([point], run, CPU, FAST, isolate=isolate, retry=True)
    assert (retried.new, retried.completed, retried.skipped) == (0, 1, 0)
    [row] = read_rows(run.rows_path)
    assert "kernels" in row.extra and row.floor_ms > 0 and row.vs_floor > 0
    assert not {"profile_error", "floor_error"} & row.extra.keys()
    assert (row.latency_ms, row.samples_ms, row.extra["point_s"]) == (
        failed.latency_ms, failed.samples_ms, failed.extra["point_s"])  # fmt: skip
    again = sweep_module.run_sweep([point], run, CPU, FAST, retry=True)
    assert (again.new, again.completed, again.skipped) == (0, 0, 1)


def test_sweep_profile_flag_and_the_kernels_view(tmp_path):
    flags = ["--models", "tiny", "--layouts", "head", "--ratios", "3:1", "--contexts", "32", "--scopes", "layer",
             "--passes", "decode",
             "--target-ms", "2", "--min-reps", "2", "--warmup-ms", "1", "--out", str(tmp_path)]  # fmt: skip
    assert run_main("sweep", *flags, "--run", "bare").returncode == 0
    assert run_main("sweep", *flags, "--run", "prof", "--profile").returncode == 0
    [bare] = read_rows(tmp_path / "bare" / "rows.jsonl")
    [row] = read_rows(tmp_path / "prof" / "rows.jsonl")
    assert "kernels" not in bare.extra and "kernel_shares" not in bare.extra
    view = run_main("table", str(tmp_path / "prof"), "--kernels")
    assert view.returncode == 0, view.stderr
    lines = view.stdout.splitlines()
    assert lines[0] == "## Kernels: prof" and lines[2].startswith("### head:3:1, decode, layer scope, 32, batch 1")
    assert f"latency {row.latency_ms:.4g} ms; floor {row.floor_ms:.4g} ms; kernels " in view.stdout
    assert "| kernel | ms | share | launches | kind | floor parts | launched from |" in lines
    assert any(line.startswith("| aten::mm |") and "in_proj, o_proj" in line for line in lines)
    assert any(line.startswith("| other (") for line in lines)
    empty = run_main("table", str(tmp_path / "bare"), "--kernels")
    assert empty.returncode == 0 and "holds a kernel profile (`hhbench sweep --profile`)" in empty.stdout
    # the report's figure: the row's kernel time by kind, its latency and floor beside; none without profiles
    figure = next(f for f in build_report(load_runs([tmp_path / "prof"])).figures if f.slug == "kernels").figure
    bars = {trace.name: trace.x[0] for trace in figure.data if trace.type == "bar"}
    assert list(bars) == ["floor kernels", "shared kernels", "rest kernels"]
    assert sum(bars.values()) == pytest.approx(row.extra["kernels"]["kernel_ms"])
    bare_report = build_report(load_runs([tmp_path / "bare"]))
    assert "kernels" not in {f.slug for f in bare_report.figures}
    assert not any(o.title.startswith("Kernel time") for o in bare_report.omitted)  # opt-in: nothing to miss
    both = run_main("table", str(tmp_path / "prof"), "--kernels", "--targets")
    assert both.returncode == 2 and both.stderr.count("\n") == 1
    assert "--kernels is a view of its own" in both.stderr


def test_a_suite_asks_for_the_profile_by_its_grid_key(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\n[[grid]]\nmodels = "tiny"\ncontexts = [64]\nprofile = true\n')
    assert all(point.profile for point in load_suite(str(path), "cpu").points)
    assert not any(point.profile for point in load_suite("cpu", "cpu").points)  # off by default
    path.write_text('name = "s"\n[[grid]]\nmodels = "tiny"\nprofile = "yes"\n')
    with pytest.raises(UserError, match="grid key profile takes true or false, got 'yes'"):
        load_suite(str(path), "cpu")


def test_the_kernels_heading_gives_the_host_time_where_measured():
    from types import SimpleNamespace

    from hhbench.tables.kernels import row_heading

    profile = {"kernel_ms": 0.59, "step_ms": 3.1, "activity": "cuda"}
    row = SimpleNamespace(scope="layer", variant="head:7:1", pass_="prefill", context=4096, batch=1, latency_ms=2.68,
                          floor_ms=0.5, fa_backend="sdpa-cudnn", gdn_impl="", gdn_backend="flash-qla",
                          extra={"kernels": profile, "host_ms": 2.5})  # fmt: skip
    assert "; host 2.5 ms to issue it (host-bound)" in row_heading(row), "2.5 ms of a 2.68 ms step: over 90%"
    row.extra["host_ms"] = 2.4  # 89.6% of the step
    assert row_heading(row).endswith("; host 2.4 ms to issue it")
    for unknown in (None, float("nan"), "2.4"):  # a row file edited by hand: no host time, no error
        row.extra["host_ms"] = unknown
        assert "host" not in row_heading(row)
    del row.extra["host_ms"]
    assert "host" not in row_heading(row)


def test_kernels_are_traced_to_the_hhbench_function_that_launched_them(monkeypatch):
    """On the CPU the operators' launch sites come from the ranges hhbench's functions open while profiled; on CUDA a
    kernel is traced through the operator its correlation links it to (fake events here: the CUDA branch needs no
    GPU). Every operator listed by name: the conv's rank among a tiny layer's operators is a matter of timing (on a
    busy 2-core machine it fell out of the top 12)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Kernel

    from hhbench.measure.profile import UNKNOWN_SITE, _sites, launch_site

    monkeypatch.setattr(measurements, "PROFILE_TOP", 1000)
    [point] = grid_points({**TINY, "layouts": "head", "passes": "prefill", "profile": True}, "cpu")
    row = measure_point(point, CPU, FAST, {})
    sites = {line["name"]: dict(line["sites"]) for line in row.extra["kernels"]["top"]}
    assert CONV_SITE in sites["aten::mkldnn_convolution"]  # the GDN heads' conv
    assert any(site.startswith("hhbench/layers/hydrahead.py") for site in sites["aten::mm"])  # a projection
    view = markdown_table(kernel_frame(row))
    assert "| launched from |" in view and f"{CONV_SITE.removeprefix('hhbench/layers/')} (100%)" in view

    def event(name, parent=None, kernels=(), sequence_nr=-1, fwd_thread=0):
        return SimpleNamespace(name=name, cpu_parent=parent, device_type=DeviceType.CPU,
                               is_user_annotation="): " in name, kernels=list(kernels),
                               sequence_nr=sequence_nr, fwd_thread=fwd_thread)  # fmt: skip

    package = Path(hhbench.__file__).parent  # hhbench's own files, wherever it was imported from
    layer = event(f"{package}/layers/hydrahead.py(255): _finish", event("run.py(3): <module>"))
    op = event("aten::cat", layer, [Kernel("CatArrayBatchedCopy", 0, 250.0)])
    stray = event("aten::add", event("triton/jit.py(9): run"), [Kernel("add_kernel", 0, 10.0)])
    assert launch_site(op) == "hhbench/layers/hydrahead.py:255 _finish" and launch_site(stray) == UNKNOWN_SITE
    # a checkout named hhbench holding its .venv (scripts/setup.sh's layout): torch's frames are not hhbench's
    torch_frame = event("/home/u/hhbench/.venv/lib/python3.12/site-packages/torch/nn/modules/linear.py(125): forward",
                        layer)  # fmt: skip
    assert launch_site(event("aten::mm", torch_frame)) == "hhbench/layers/hydrahead.py:255 _finish"
    assert launch_site(event("/home/u/hhbench/experiments/h200/layer_overhead.py(40): <module>")) == UNKNOWN_SITE
    # training: a backward kernel, launched on autograd's thread (no Python frames above it), is traced through its
    # backward node (the forward's sequence number and thread) to the forward operator's site
    product = event("aten::mul", layer, sequence_nr=7)
    node = event(
        "MulBackward0", event("autograd::engine::evaluate_function: MulBackward0"), sequence_nr=7, fwd_thread=1
    )
    gradient = event("aten::mul", node, [Kernel("mul_kernel", 0, 40.0)])
    assert list(_sites([layer, op, stray, product, node, gradient], torch.device("cuda"))) == [
        ("CatArrayBatchedCopy", "hhbench/layers/hydrahead.py:255 _finish", 0.25),
        ("add_kernel", UNKNOWN_SITE, 0.01),
        ("mul_kernel", "hhbench/layers/hydrahead.py:255 _finish backward", 0.04),
    ]


def test_kernel_names_keep_what_tells_them_apart():
    from hhbench.tables.kernels import short_name

    # PyTorch's cat kernels: "(anonymous namespace)" is no argument list (it showed as "at::native::")
    cat = ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>,"
           " unsigned int, 4, 64, 64>(at::native::(anonymous namespace)::OpaqueType<2u>*, unsigned int)")  # fmt: skip
    assert short_name(cat) == "at::native::CatArrayBatchedCopy<at::native::OpaqueType<2u>, unsigned int, 4, 64, 64>"
    assert short_name("void add_kernel<float>(float*, int)") == "add_kernel<float>"
    assert short_name("aten::mm") == "aten::mm"


def test_kernel_time_no_hhbench_function_launched_counts_under_unknown(monkeypatch):
    """A kernel that no profiled operator holds (on CUDA one launched from Python, a Triton kernel: its launch has
    no operator to link it to) and one whose walk up leaves the step for the profiler's own frame count under `?`,
    so that a kernel's sites add up to its time."""
    from types import SimpleNamespace

    from hhbench.measure import profile as profile_module

    x = torch.randn(32, 32)
    monkeypatch.setattr(profile_module, "_sites", lambda events, device: iter(()))  # no operator holds a kernel
    found = profile_kernels(lambda: x @ x, CPU, 2)
    assert found.sites and all(found.sites[name] == {"?": found.ms[name]} for name in found.ms)
    package = Path(hhbench.__file__).parent
    profiler_frame = SimpleNamespace(name=f"{package}/measure/profile.py(120): profile_kernels", cpu_parent=None)
    step_range = SimpleNamespace(name="ProfilerStep#3", cpu_parent=profiler_frame)  # spans the call, not in it
    assert profile_module.launch_site(step_range) == "?"


def test_a_backward_kernel_is_traced_to_the_forward_function_it_differentiates():
    x, weight = torch.randn(1, 16, 8, requires_grad=True), torch.randn(8, 4, requires_grad=True)

    def step():
        y, _ = causal_conv(x, weight)
        return torch.autograd.grad(y.sum(), [x, weight])

    found = profile_kernels(step, CPU, 1)
    convolution = found.sites["aten::convolution_backward"]  # on the CPU it ran under the test's own frame
    assert set(convolution) == {f"{CONV_SITE} backward"}, convolution
    assert CONV_SITE in found.sites["aten::cat"]  # the forward's own


def test_profiling_marks_hhbench_functions_without_torchs_python_tracer(monkeypatch):
    """with_stack killed profiled processes on the H200 (SIGSEGV, results/gpu-tests-h200/call-6): the profiler runs
    without it, and hhbench's functions open ranges of their own. A call of an hhbench function that raises leaves
    the ranges paired: the operators after it are still traced to the function that launched them; and the profile
    hook in place before (a Python function) is back afterwards."""
    import sys

    from hhbench.measure import profile as profile_module

    asked = []
    real_profile = profile_module.profile
    monkeypatch.setattr(profile_module, "profile", lambda **kwargs: asked.append(kwargs) or real_profile(**kwargs))
    x, weight = torch.randn(1, 16, 8), torch.randn(8, 4)

    def step():
        with pytest.raises(AttributeError):
            causal_conv(None, weight)  # raises inside an hhbench function
        list(profile_module.KernelTimes(1, 0.0).ms.items())  # an hhbench dataclass's generated code: not a range
        return causal_conv(x, weight)

    def hook(frame, event, arg):
        return None

    sys.setprofile(hook)
    try:
        found = profile_kernels(step, CPU, 2)
        assert sys.getprofile() is hook
    finally:
        sys.setprofile(None)
    assert asked and not any(kwargs.get("with_stack") for kwargs in asked)
    assert set(found.sites["aten::mkldnn_convolution"]) == {CONV_SITE}
    assert not [name for name in found.ms if "hhbench/" in name]  # the functions' ranges are no kernels


def test_a_profiler_written_in_c_keeps_its_hook_and_the_profile_runs():
    """Python can neither call nor put back a profile hook installed from C (cProfile's): restoring it with
    sys.setprofile raised TypeError ('Profile' object is not callable) at the end of the first profiled call, so
    `python -m cProfile -m hhbench sweep --profile` lost every profile. The profile now runs, unmarked (no launch
    sites), and cProfile's hook is back."""
    import cProfile
    import sys

    x, weight = torch.randn(1, 16, 8), torch.randn(8, 4)
    outer = cProfile.Profile()
    outer.enable()
    try:
        hook = sys.getprofile()
        found = profile_kernels(lambda: causal_conv(x, weight), CPU, 2)
        assert sys.getprofile() is hook
    finally:
        outer.disable()
    assert set(found.sites["aten::mkldnn_convolution"]) == {"?"}


def test_marking_a_call_costs_a_fraction_of_a_record_function_operator():
    """Each call of an hhbench function opens a range while profiled: through the record_function operator, tens
    of microseconds a call on this host, a tiny layer's profiled decode step (about 70 hhbench calls) took 2.5x its
    time without the ranges (4.3x unprofiled); through _RecordFunctionFast 1.2x. Per call, the marking costs less
    than a quarter of one record_function operator's enter and exit, under the profiler."""
    import contextlib
    import time

    from hhbench.measure.profile import _hhbench_ranges
    from hhbench.tables.kernels import short_name  # an hhbench function that calls no other

    enter, leave = torch.ops.profiler._record_function_enter_new, torch.ops.profiler._record_function_exit
    calls = 1000

    def fastest(run, around=contextlib.nullcontext):
        times = []
        for _ in range(5):
            with around():
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
        return min(times) / calls

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        plain = fastest(lambda: [short_name("void k(int)") for _ in range(calls)])
        marked = fastest(lambda: [short_name("void k(int)") for _ in range(calls)], _hhbench_ranges)
        operator = fastest(lambda: [leave(enter("k", None)) for _ in range(calls)])
    assert marked - plain < operator / 4, (plain, marked, operator)
