"""Sweeps spread over workers (hhbench.launch) on the CPU: dealing by cost, submitit's local executor against an
inline run, a killed launch resumed, a worker killed inside a point, the run lock, merge, the SLURM script and
bad input."""

import contextlib
import ctypes
import dataclasses
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from inprocess import run_main

import hhbench
from hhbench.bench.floor import floor_parts
from hhbench.errors import UserError
from hhbench.launch import cluster, local
from hhbench.launch import run as launch_run
from hhbench.launch.cluster import parse_time
from hhbench.launch.local import crash_site
from hhbench.launch.lock import run_lock, try_lock
from hhbench.launch.merge import merge, reap
from hhbench.launch.shards import (
    CALIBRATED,
    FITTED_ON,
    Costs,
    deal,
    estimated_seconds,
    setup_group,
    setup_seconds,
    shard_seconds,
    unfinished,
)
from hhbench.launch.worker import Task
from hhbench.measure.env import device_name
from hhbench.measure.timing import TimingPolicy
from hhbench.plan.grid import grid_points
from hhbench.rows.runs import RunDir
from hhbench.rows.schema import Row, append_row, read_rows
from hhbench.runner import measurements, sweep
from hhbench.runner.measurements import PROFILE_STEPS, PROFILE_WARM_CALLS, check_group
from hhbench.runner.point import base_row
from hhbench.runner.sweep import ADDITION_RUNNING, asked_extras, measure_again, prepare_env, run_sweep
from hhbench.spec.axes import Pass, Scope
from tests.conftest import ROOT

GRID = {"models": "tiny", "layouts": "head,layer", "ratios": "3:1", "contexts": "64", "passes": "prefill,decode",
        "scopes": ["kernel", "layer"], "floor": False}  # fmt: skip
FLAGS = ["--models", "tiny", "--layouts", "head,layer", "--ratios", "3:1", "--contexts", "64", "--passes",
         "prefill,decode", "--scopes", "kernel,layer", "--target-ms", "1", "--min-reps", "2", "--max-reps", "3",
         "--warmup-ms", "0", "--no-floor"]  # fmt: skip
FAST = TimingPolicy(warmup_ms=0, target_ms=1, min_reps=2, max_reps=3)


def planned_keys() -> list[tuple]:
    return sorted(point.identity for point in grid_points(GRID, "cpu"))


def keys(run: Path) -> list[tuple]:
    return sorted(row.key for row in read_rows(run / "rows.jsonl"))


def test_a_profiled_point_is_estimated_with_its_warm_and_profiled_calls():
    point = grid_points({"models": "tiny", "layouts": "head", "ratios": "3:1", "contexts": "64k",
                         "scopes": ["layer"]}, "cpu")[0]  # fmt: skip
    policy = TimingPolicy(warmup_ms=0, target_ms=0, min_reps=1, max_reps=1)  # one timed step per timing
    plain, profiled = (estimated_seconds(dataclasses.replace(point, profile=flag), policy) for flag in (False, True))
    one_timing = estimated_seconds(dataclasses.replace(point, floor=False), policy)
    step_s = plain - one_timing  # the floor's timing: one step with this policy
    assert profiled - plain == pytest.approx((PROFILE_WARM_CALLS + PROFILE_STEPS) * step_s)


def test_points_are_dealt_by_setup_group_largest_first_to_the_least_loaded_shard():
    points = grid_points({"models": "tiny", "layouts": "head,layer", "ratios": "0:1,3:1,1:0",
                          "contexts": "1k,4k,16k,64k", "passes": "prefill,train"}, "cpu")  # fmt: skip
    policy = TimingPolicy(warmup_ms=0, target_ms=0, min_reps=1, max_reps=1)
    cost = {p.identity: estimated_seconds(p, policy) for p in points}
    assert cost[points[-1].identity] > cost[points[0].identity], "a longer context costs more"
    shards = deal(points, 3, policy)
    assert sorted(p.identity for s in shards for p in s.points) == sorted(cost), "every point in one shard"
    for shard in shards:
        assert [points.index(p) for p in shard.points] == sorted(points.index(p) for p in shard.points)
    groups = {setup_group(p) for p in points}
    assert all(sum(g in {setup_group(p) for p in s.points} for s in shards) == 1 for g in groups), "none split"
    loads = [s.seconds for s in shards]
    largest = max(shard_seconds(tuple(p for p in points if setup_group(p) == g), policy) for g in groups)
    assert max(loads) - min(loads) <= largest, "LPT over groups: within one group of each other"
    assert loads == [pytest.approx(shard_seconds(s.points, policy)) for s in shards]
    assert deal(points, 3, policy) == shards, "the same shards on every rerun"
    done = {p.identity for p in shards[1].points} | {shards[2].points[0].identity}
    left = unfinished(shards, done, policy)
    assert [(s.name, len(s.points)) for s in left] == [
        ("shard-0-of-3", len(shards[0].points)),
        ("shard-2-of-3", len(shards[2].points) - 1),
    ]
    with pytest.raises(ValueError):
        deal(points, 0, policy)


@pytest.mark.parametrize("setup, sizes, makespan", [(1.0, [4, 4], 402.0), (1000.0, [6, 2], 1600.0)])
def test_a_setup_group_is_split_only_where_that_ends_the_shards_sooner(setup, sizes, makespan):
    """Groups of six and two points, 100 s each: with a 1 s setup the six are split 4 + 2 (402 s, not 601); with a
    1000 s setup they stay whole (1600 s; split, the second worker would take 2300)."""
    six = grid_points({"models": "tiny", "layouts": "head", "ratios": "3:1", "contexts": "1k,2k,4k,8k,16k,32k"}, "cpu")
    two = grid_points({"models": "tiny", "layouts": "layer", "ratios": "3:1", "contexts": "1k,2k"}, "cpu")
    costs = Costs(100.0, 1.0, 1.0, dict.fromkeys(("prefill", "train", "decode", "model"), setup), {})
    policy = TimingPolicy(warmup_ms=0, target_ms=0, min_reps=1, max_reps=1)
    shards = deal(six + two, 2, policy, costs)
    assert [len(s.points) for s in shards] == sizes
    assert max(s.seconds for s in shards) == pytest.approx(makespan, rel=1e-3)


def test_a_backend_one_cost_class_was_not_fitted_on_takes_the_other_classes_setup():
    """A kernel-scope FlashQLA group (default-h200x2-cold, the kernel class's fit, ran without FlashQLA) takes the
    layer scope's FlashQLA setup, not fla-chunk's 1 s of Triton tuning; fla-chunk and a backend no class was
    fitted on (the CPU's) keep their own class's."""
    point = grid_points({"models": "tiny", "layouts": "head", "ratios": "3:1", "contexts": "1k"}, "cpu")[0]
    assert point.scope is Scope.KERNEL and point.pass_ is Pass.PREFILL
    flash_qla = dataclasses.replace(point, gdn_backend="flash-qla")
    assert setup_seconds(flash_qla) == CALIBRATED["layer"].setup_s["prefill flash-qla"]
    assert setup_seconds(dataclasses.replace(point, gdn_backend="fla-chunk")) == setup_seconds(point) == 1


def test_two_streams_share_their_sequential_twins_setup_group():
    sequential, streams = grid_points({"models": "tiny", "layouts": "head", "ratios": "1:1", "contexts": "1k",
                                       "modes": ["sequential", "streams"]}, "cuda")  # fmt: skip
    assert setup_group(sequential) == setup_group(streams)
    assert check_group(sequential) != check_group(streams), "each mode is still checked"


def replayed(name: str) -> tuple[dict, RunDir, list, tuple]:
    """scripts/replay_dealing.py's functions, the committed run `name`, its rows, and (points, policy, point_of,
    cold firsts) as the script derives them."""
    replay = runpy.run_path(str(ROOT / "scripts" / "replay_dealing.py"))
    run = RunDir.open(str(ROOT / "results" / name))
    rows = list(run.rows())
    points, policy, point_of = replay["plan"](run, rows)
    firsts = replay["cold_firsts"](rows, replay["session_sizes"](run.path / "sweep.log"), point_of)
    return replay, run, rows, (points, policy, point_of, firsts)


@pytest.mark.parametrize("cost_class", sorted(FITTED_ON))
def test_the_calibrated_costs_are_the_fit_of_the_committed_h200_sweep(cost_class):
    """CALIBRATED[class] is what scripts/replay_dealing.py fits on FITTED_ON[class], rounded as it prints it."""
    replay, _, rows, (_, policy, point_of, firsts) = replayed(FITTED_ON[cost_class])
    assert (
        replay["rounded"](replay["fit"](*replay["cost_classes"](rows, firsts)[cost_class], point_of, policy))
        == CALIBRATED[cost_class]
    )


def test_the_default_suite_dealt_to_two_gpus_replays_within_4_percent_of_an_even_split():
    """The measured single-GPU run of suites/default.toml (warm caches, results/default-h200x1), its point times
    replayed through deal() on two workers: the longer worker within 4% of half the total (240 and 236 s of 476).
    The dealing at 1da787e (a layer-wise unit estimated as one layer; one roofline fraction for cuDNN and fla alike)
    replays 250 and 226 s, and the measured two-GPU run it dealt (results/default-h200x2) took 260 and 206 s."""
    replay, _, rows, (points, policy, point_of, firsts) = replayed("default-h200x1")
    seconds, setup = replay["measured_costs"](rows, firsts, point_of)
    times = replay["replay"](deal(points, 2, policy), seconds, setup)
    assert max(times) <= 1.04 * sum(times) / 2


def test_a_cost_class_whose_points_were_all_cold_firsts_is_not_fitted_and_the_replay_goes_on(
    tmp_path, monkeypatch, capsys
):
    """A run where every point was its setup group's first on its worker (the cpu suite at layer and model scope:
    one context per group) leaves no point time to tell from a setup: the class says so in one line and the replay
    is printed (it raised StatisticsError: no median for empty data)."""
    replay = runpy.run_path(str(ROOT / "scripts" / "replay_dealing.py"))
    measured = ROOT / "results" / "floor-targets-h200"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "env.json").write_text((measured / "env.json").read_text())
    rows = [json.loads(line) for line in (measured / "rows.jsonl").read_text().splitlines()]
    lines = [json.dumps({**row, "worker": f"w{i}"}) for i, row in enumerate(rows)]  # each point its own worker
    (tmp_path / "run" / "rows.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(sys, "argv", ["replay_dealing.py", str(tmp_path / "run")])
    assert replay["main"]() == 0
    out = capsys.readouterr().out
    assert "layer: not fitted: every point was its setup group's cold first" in out
    assert "2 workers, calibrated: makespan" in out


def test_the_fit_has_no_infinite_zero_or_negative_cost():
    """A fit that gives the FA share no time keeps one finite fraction for both (nnls put its inverse at 0: an
    infinite fraction); a CPU run's fractions (about 1e-5) print as themselves, not 0.0; medians below zero (warm
    caches) fit as no cost, not a negative setup that deal() would split groups to gain."""
    replay, _, rows, (_, policy, point_of, firsts) = replayed("floor-targets-h200")
    second = types.SimpleNamespace(flops_total=1e15, flops_fa_core=0.0, bytes_moved=0.0, latency_ms=2000.0)
    first = types.SimpleNamespace(flops_total=2e15, flops_fa_core=1e15, bytes_moved=0.0, latency_ms=1000.0)
    fa, rest = replay["roofline_fractions"]([first, second])
    assert 0 < fa == rest < float("inf")
    assert replay["rounded"](Costs(1.0, 1.14e-5, 3.2e-4, {}, {})).roofline_fraction == 1e-5
    idle = [dataclasses.replace(row, extra={**row.extra, "point_s": 0.0}) for row in rows]
    costs = replay["fit"](idle, firsts, point_of, policy)
    assert costs.point_s == 0 and set(costs.setup_s.values()) == {0}


def test_the_replay_of_a_run_it_cannot_replay_is_one_line(tmp_path, monkeypatch, capsys):
    """scripts/replay_dealing.py on a partial run of a suite, a run of grid flags, no run, or no workers: one line on
    stderr and exit 2 (it raised KeyError and UserError tracebacks)."""
    replay = runpy.run_path(str(ROOT / "scripts" / "replay_dealing.py"))
    measured = ROOT / "results" / "floor-targets-h200"
    env = json.loads((measured / "env.json").read_text())
    for name, suite in (("partial", env["suite"]), ("custom", "custom")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "env.json").write_text(json.dumps({**env, "suite": suite}))
        rows = (measured / "rows.jsonl").read_text().splitlines(keepends=True)[:10]
        (tmp_path / name / "rows.jsonl").write_text("".join(rows))
    cases = {"partial": "of the 49 points of suite 'floor-h200' have no row", "custom": "a sweep of grid flags",
             "none": "no run at"}  # fmt: skip
    for name, message in cases.items():
        monkeypatch.setattr(sys, "argv", ["replay_dealing.py", str(tmp_path / name)])
        assert replay["main"]() == 2, name
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    monkeypatch.setattr(sys, "argv", ["replay_dealing.py", "--workers", "2", "0"])
    with pytest.raises(SystemExit) as exit_:
        replay["main"]()
    assert exit_.value.code == 2 and "a worker count is a whole number >= 1, not '0'" in capsys.readouterr().err


def test_the_replay_without_git_history_replays_the_calibrated_dealing_alone(monkeypatch, capsys):
    """In a shallow clone or an installed copy (git show of the old commit fails) the replay says the old dealing
    is not replayed and replays the calibrated one (it raised CalledProcessError)."""
    replay = runpy.run_path(str(ROOT / "scripts" / "replay_dealing.py"))

    def no_history(*args, **kwargs):
        raise subprocess.CalledProcessError(128, args[0])

    monkeypatch.setattr(replay["subprocess"], "run", no_history)
    monkeypatch.setattr(sys, "argv", ["replay_dealing.py", str(ROOT / "results" / "default-h200x1")])
    assert replay["main"]() == 0
    out = capsys.readouterr().out
    assert "not replayed: git or that commit is not here" in out
    assert "2 workers, calibrated: makespan" in out and "2 workers, before" not in out


def test_the_local_launcher_killed_midway_resumes_to_the_keys_of_an_inline_run(cli, tmp_path):
    """--launcher local --shards 2, killed as a whole (the sweep, submitit's jobs, their workers), then the same
    command again: every key of an inline run of the plan, each once, all measured."""
    run_sweep(grid_points(GRID, "cpu"), RunDir(tmp_path / "inline"), torch.device("cpu"), FAST)
    args = ["sweep", *FLAGS, "--launcher", "local", "--shards", "2", "--out", str(tmp_path), "--run", "k"]
    shards = tmp_path / "k" / "shards"
    process = subprocess.Popen([sys.executable, "-m", "hhbench", *args], env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and sum(len(p.read_text().splitlines()) for p in shards.glob("*.jsonl")) < 3:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(0.5)  # the kernel drops the dead workers' locks
    measured = sum(len(p.read_text().splitlines()) for p in shards.glob("*.jsonl"))
    assert 3 <= measured < 8, "the kill must land midway"

    planned = run_main(*args, "--dry-run")
    assert planned.returncode == 0 and "0 points already" not in planned.stdout, planned.stderr
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    rows = read_rows(tmp_path / "k" / "rows.jsonl")
    assert keys(tmp_path / "k") == keys(tmp_path / "inline") == planned_keys(), "same keys, none twice"
    assert {row.status for row in rows} == {"ok"} and {row.worker for row in rows} == {"shard-0-of-2", "shard-1-of-2"}
    workers = json.loads((tmp_path / "k" / "env.json").read_text())["workers"]
    assert sorted(workers) == ["shard-0-of-2", "shard-1-of-2"]
    assert all(w["host"] and w["device"].startswith("cpu") for w in workers.values())
    assert not list(shards.glob("*.jsonl")), "all merged"


def _kill_inside_a_point(shards: Path, worker: str, killed: list, how: signal.Signals = signal.SIGKILL) -> None:
    """Signal worker `worker` (found by its task file on its command line) once it has a row and is inside a
    later point (its noted point has no row yet): SIGKILL as the kernel's OOM killer would, SIGSEGV as a crashing
    kernel library would. The worker is stopped (SIGSTOP) while its files are read, so that it cannot finish the
    point while they are, nor while /proc is searched (a CI run saw it do so: the signal landed between two points,
    and no point was lost)."""
    task, current, rows = (str(shards / f"{worker}.task.pkl"), shards / f"{worker}.current.json",
                           shards / f"{worker}.jsonl")  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not killed:
        pids = [int(proc.name) for proc in Path("/proc").iterdir() if _runs(proc, task)]
        stopped = [pid for pid in pids if _signal(pid, signal.SIGSTOP)]
        try:
            noted = Row.from_dict(json.loads(current.read_text())).key
            inside = rows.exists() and noted not in {row.key for row in read_rows(rows)} and rows.read_text()
            if inside:
                killed += [pid for pid in stopped if _signal(pid, how)]
        except (OSError, ValueError):  # not there yet, or stopped while being written
            pass
        finally:  # a stopped process takes its signal (SIGSEGV: faulthandler's stack) once continued
            for pid in stopped:
                _signal(pid, signal.SIGCONT)
        time.sleep(0.01)


def _runs(proc: Path, task: str) -> bool:
    """Whether /proc entry `proc` is a process whose command line names `task`."""
    try:
        return proc.name.isdigit() and task in (proc / "cmdline").read_bytes().decode()
    except OSError:  # gone meanwhile
        return False


def _signal(pid: int, how: signal.Signals) -> bool:
    """Send `how` to process `pid`'s main thread (tgkill: a signal sent to a stopped process goes to any of its
    threads once it continues, and a SIGSEGV in a thread without Python frames names no hhbench line); False where
    the process is gone."""
    return LIBC.tgkill(pid, pid, int(how)) == 0


LIBC = ctypes.CDLL(None, use_errno=True)  # glibc's tgkill (2.30 and later)


def test_a_crash_site_is_the_dumps_innermost_frame_and_hhbenchs_own():
    own = str(Path(hhbench.__file__).resolve().parent / "measure" / "profile.py")
    dump = f"""earlier output
Fatal Python error: Segmentation fault

Thread 0x00007f01 (most recent call first):
  File "/x/threading.py", line 1 in wait

Current thread 0x00007f02 (most recent call first):
  Garbage-collecting
  File "/v/lib/python3.12/site-packages/torch/profiler/profiler.py", line 812 in step
  File "{own}", line 170 in profile_kernels
  File "/x/worker.py", line 9 in <module>

Extension modules: torch._C (total: 1)
"""
    site = crash_site(dump)
    assert site == "torch/profiler/profiler.py:812 (step), from hhbench/measure/profile.py:170 (profile_kernels)"
    torch_frame = '  File "/v/lib/python3.12/site-packages/torch/profiler/profiler.py", line 812 in step\n'
    assert crash_site(dump.replace(torch_frame, "")) == "hhbench/measure/profile.py:170 (profile_kernels)"
    assert crash_site("exit status 1: no dump here") is None


# What Python 3.11 printed for a process whose own thread (no Python state: a library's) crashed while the main thread
# ran hhbench's code, and what 3.14 prints: thread names, and the crashed thread's C stack after the Python stacks.
NATIVE_THREAD_DUMP = """Fatal Python error: Segmentation fault

Thread 0x00007f60e9004b80 (most recent call first):
  File "{own}", line 126 in __call__
  File "/v/lib/python3.11/site-packages/torch/autograd/__init__.py", line 200 in backward
"""
DUMP_314 = """Fatal Python error: Aborted

Thread 0x00007f01 [pt_autograd_0] (most recent call first):
  <no Python frame>

Current thread 0x00007f02 [python] (most recent call first):
  File "{site}/fla/ops/utils.py", line ??? in wrapper
  File "<frozen importlib._bootstrap>", line 241 in _call_with_frames_removed
  File "{own}", line 170 in profile_kernels
plus 140 frames

Current thread's C stack trace (most recent call first):
  Binary file "/usr/bin/python3.14", at _Py_DumpStack+0x4c [0x55d1]
  <truncated rest of calls>

Extension modules: torch._C (total: 1)
"""


def test_crash_sites_as_each_python_prints_them_and_from_folders_on_the_path(tmp_path, monkeypatch):
    """Python 3.14's dump (thread names, a C stack after the Python ones, an unknown line, 'plus N frames'), a
    crash in a thread without Python frames, importlib's frozen frames passed over, and a library on PYTHONPATH
    (/tmp/site on the H200s) named as its import names it."""
    own = Path(hhbench.__file__).resolve().parent / "bench" / "workloads.py"
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    dump = DUMP_314.format(site=tmp_path / "site", own=own)
    assert crash_site(dump) == "fla/ops/utils.py:??? (wrapper), from hhbench/bench/workloads.py:170 (profile_kernels)"
    frozen = dump.replace(f'  File "{tmp_path}/site/fla/ops/utils.py", line ??? in wrapper\n', "")
    assert crash_site(frozen) == "hhbench/bench/workloads.py:170 (profile_kernels)"
    assert crash_site(NATIVE_THREAD_DUMP.format(own=own)) == (
        "a thread without Python frames, while another was in hhbench/bench/workloads.py:126 (__call__)"
    )
    earlier = DUMP_314.format(site=tmp_path / "site", own=own)  # a crash before a restart, then this one
    assert crash_site(earlier + "restarted\n" + NATIVE_THREAD_DUMP.format(own=own)).startswith("a thread without")


def test_a_submitit_job_whose_own_process_crashed_says_where(tmp_path):
    """A job's process (the one supervising its workers) killed by a signal: submitit says only that it 'has not
    produced any output'; shard_job leaves the crash's stack in the job's stderr log, and the failure line names it."""
    crash = "import ctypes; from hhbench.launch import cluster; cluster.run_on_gpus = lambda *a: ctypes.string_at(0)"
    log = tmp_path / "1_0_log.err"
    with open(log, "w") as stderr:
        task = "__import__('types').SimpleNamespace(device='cpu')"
        died = subprocess.run([sys.executable, "-c", f"{crash}; cluster.shard_job({task})"], cwd=ROOT, stderr=stderr)
    assert died.returncode == -signal.SIGSEGV
    said = (
        "Job 1 (task: 0) with path /r/1_0_result.pkl\nhas not produced any output (state: FINISHED)\nNo error "
        "stream produced. Look at stdout: /r/1_0_log.out\n----\nsubmitit INFO (x) - Loading pickle: /r/1.pkl\n"
    )
    job = types.SimpleNamespace(exception=lambda: RuntimeError(said), paths=types.SimpleNamespace(stderr=log))
    assert re.fullmatch(
        r"its process died of a signal in ctypes/__init__\.py:\d+ \(string_at\), from "
        r"hhbench/launch/cluster\.py:\d+ \(shard_job\)",
        cluster.job_failure(job),
    ), cluster.job_failure(job)
    log.write_text("")  # no dump (a SIGKILL): submitit's line, not the job's log lines it quotes after it
    assert cluster.job_failure(job) == "has not produced any output (state: FINISHED)"
    raised = types.SimpleNamespace(exception=lambda: RuntimeError("trace\nValueError: bad"), paths=job.paths)
    assert cluster.job_failure(raised) == "ValueError: bad"
    assert cluster.job_failure(types.SimpleNamespace(exception=lambda: None)) is None


@pytest.mark.parametrize("how", [signal.SIGSEGV, signal.SIGABRT], ids=lambda how: how.name)
def test_a_worker_that_crashes_as_it_starts_names_where(tmp_path, monkeypatch, how):
    """A worker killed by a signal while it imports (here in sitecustomize, as `import torch` may crash on a broken
    install) leaves its stack: faulthandler is on from the interpreter's start, not from the worker's first line.
    An earlier process's crash in the same log is not this one's."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import os\nos.kill(os.getpid(), {int(how)})\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.syspath_prepend(str(site))  # as in this process where PYTHONPATH named it at its start
    run = RunDir(tmp_path / "r")
    run.shard("cpu").log.parent.mkdir(parents=True)
    run.shard("cpu").log.write_text(NATIVE_THREAD_DUMP.format(own=hhbench.__file__))
    worker = local.WorkerProcess.start(run, Task(str(run.path), "cpu", (), FAST, "", "cpu"), None)
    worker.process.wait()
    assert worker.failure() == f"killed by {how.name} in sitecustomize.py:2 (<module>)", worker.failure()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSEGV])
def test_a_worker_killed_inside_a_point_costs_that_point_only(tmp_path, monkeypatch, how):
    """--gpus on the CPU: two fake GPUs give two real worker processes (CUDA_VISIBLE_DEVICES 0 and 1). A crash
    (SIGSEGV) names where the worker was, from the stack faulthandler left in its log; SIGKILL leaves none."""
    monkeypatch.setattr(launch_run, "visible_gpus", lambda: ["0", "1"])
    killed = []
    killer = threading.Thread(target=_kill_inside_a_point, args=(tmp_path / "g" / "shards", "gpu1", killed, how))
    killer.start()
    result = run_main("sweep", *FLAGS, "--gpus", "2", "--out", str(tmp_path), "--run", "g",
                      env={"PYTHONPATH": str(ROOT)})  # fmt: skip
    killer.join()
    assert result.returncode == 0 and killed, result.stderr
    rows = read_rows(tmp_path / "g" / "rows.jsonl")
    assert keys(tmp_path / "g") == planned_keys()
    errors = [row for row in rows if row.status != "ok"]
    assert len(errors) == 1 and errors[0].worker == "gpu1", [(r.status, r.reason) for r in rows]
    if how == signal.SIGKILL:
        assert "worker gpu1 stopped while measuring this point (killed by SIGKILL)" in errors[0].reason, errors[
            0
        ].reason
    else:
        # faulthandler writes line ??? where it cannot tell a frame's line (CI saw hhbench/bench/workloads.py:??? (run))
        assert re.search(r"\(killed by SIGSEGV in \S+\.py:(\d+|\?\?\?) \(\S+\)", errors[0].reason), errors[0].reason
    assert {row.worker for row in rows} == {"gpu0", "gpu1"}
    env = json.loads((tmp_path / "g" / "env.json").read_text())
    assert {name: w["cuda_visible_devices"] for name, w in env["workers"].items()} == {"gpu0": "0", "gpu1": "1"}
    assert [session["worker_count"] for session in env["sessions"]] == [2]


def test_each_session_records_its_command_and_workers(tmp_path, monkeypatch):
    """A run resumed with --gpus 2 after a session of env.json's older form (no argv or workers in its sessions):
    the old session is kept as it was, the new one says how it ran, the run's argv stays the first session's."""
    run = RunDir(tmp_path / "r").create()
    first = {"time": "2026-11-30T02:07:10+00:00", "hhbench_commit": "0f29b51", "wall_s": 501.4}
    run.write_env({"device": device_name(), "argv": ["sweep", "--gpus", "1"], "sessions": [first]})
    monkeypatch.setattr(sys, "argv", ["hhbench", "sweep", "--gpus", "2"])
    prepare_env(run, "floor-h200", torch.device("cpu"), workers=2)
    env = run.env()
    assert env["argv"] == ["sweep", "--gpus", "1"] and env["sessions"][0] == first
    assert {k: env["sessions"][1][k] for k in ("argv", "worker_count")} == {
        "argv": ["sweep", "--gpus", "2"],
        "worker_count": 2,
    }
    lines = runpy.run_path(str(ROOT / "scripts" / "compare_runs.py"))["sessions"](run.env())
    assert lines[0] == "  session 1: 2026-11-30T02:07:10+00:00, 501.4 s, workers ?, argv ?"
    assert lines[1].endswith(", ? s, workers 2, argv sweep --gpus 2"), lines


def test_compare_runs_without_a_run_is_one_line(tmp_path, monkeypatch, capsys):
    compare = runpy.run_path(str(ROOT / "scripts" / "compare_runs.py"))
    measured = str(ROOT / "results" / "floor-targets-h200")
    monkeypatch.setattr(sys, "argv", ["compare_runs.py", measured, str(tmp_path / "none")])
    assert compare["main"]() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run at" in err, err
    monkeypatch.setattr(sys, "argv", ["compare_runs.py", measured, measured, "--wall", "10", "0"])
    with pytest.raises(SystemExit) as exit_:  # was a ZeroDivisionError traceback
        compare["main"]()
    assert exit_.value.code == 2 and "--wall takes two positive seconds" in capsys.readouterr().err


def test_compare_runs_on_files_that_do_not_read_is_one_line_and_a_zero_wall_no_ratio(tmp_path, monkeypatch, capsys):
    """A rows.jsonl or env.json that does not read: one line, exit 2 (UserError tracebacks); a run whose sessions'
    wall_s sum to 0.0 (rounded to 0.1 s) prints no speed-up (ZeroDivisionError)."""
    compare = runpy.run_path(str(ROOT / "scripts" / "compare_runs.py"))
    measured = ROOT / "results" / "floor-targets-h200"
    for name, broken in (("rows", "rows.jsonl"), ("env", "env.json"), ("zero", None)):
        (tmp_path / name).mkdir()
        for file in ("rows.jsonl", "env.json"):
            (tmp_path / name / file).write_text((measured / file).read_text())
        if broken:
            (tmp_path / name / broken).write_text("{not json\n")
    env = json.loads((measured / "env.json").read_text())
    (tmp_path / "zero" / "env.json").write_text(json.dumps({**env, "sessions": [{"wall_s": 0.0}]}))
    for name, message in (("rows", "rows.jsonl:1: "), ("env", "cannot read ")):
        monkeypatch.setattr(sys, "argv", ["compare_runs.py", str(measured), str(tmp_path / name)])
        assert compare["main"]() == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    monkeypatch.setattr(sys, "argv", ["compare_runs.py", str(measured), str(tmp_path / "zero"), "--wall", "1", "1"])
    assert compare["main"]() == 0 and "speed-up: 1.00x" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["compare_runs.py", str(measured), str(tmp_path / "zero")])
    assert compare["main"]() == 0
    out = capsys.readouterr().out
    assert "| 1369.0 |" in out and "| 0.0 |" in out and "speed-up" not in out


def test_compare_runs_tells_the_two_gpus_apart(monkeypatch, capsys):
    """The committed default suite on one H200 and on two: identical keys (exit 0), the 1.78x, and by pair of
    workers the same GPU agreeing (median within 0.5%) where the second GPU reads slower."""
    compare = runpy.run_path(str(ROOT / "scripts" / "compare_runs.py"))
    runs = [str(ROOT / "results" / name) for name in ("default-h200x1", "default-h200x2")]
    monkeypatch.setattr(sys, "argv", ["compare_runs.py", *runs])
    assert compare["main"]() == 0
    out = capsys.readouterr().out
    assert "speed-up: 1.78x" in out and "key sets identical: True" in out
    pairs = {tuple(cells[1:3]): float(cells[4].split("%")[0]) for line in out.splitlines()
             if (cells := [c.strip() for c in line.split("|")])[1:2] in (["gpu0"], ["gpu1"])}  # fmt: skip
    assert set(pairs) == {("gpu0", "gpu0"), ("gpu0", "gpu1")}
    assert abs(pairs["gpu0", "gpu0"]) < 0.5 < pairs["gpu0", "gpu1"]
    named = [line.split(" ms [")[0].rsplit(": ", 1)[0] for line in out.splitlines() if line.startswith("  apart: ")]
    assert len(set(named)) == len(named) == 96, "each point apart named once (sequential and streams told apart)"
    assert "  apart: head:7:1 32768 1 prefill kernel streams" in named


def test_a_second_sweep_into_a_locked_run_is_refused(tmp_path):
    run = RunDir(tmp_path / "r").create()
    run.rows_path.touch()
    with run_lock(run):  # as a first sweep holds it while it runs
        second = run_main("sweep", *FLAGS, "--out", str(tmp_path), "--run", "r")
        merging = run_main("merge", str(run.path))
    for result in (second, merging):
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"run {run.path} is being written by another hhbench process (pid {os.getpid()}" in result.stderr
    assert not run.rows_path.read_text()
    with run_lock(run):  # released at the end of the first
        pass


def test_a_worker_dying_inside_an_addition_keeps_the_points_latency(tmp_path, monkeypatch):
    """A crash inside an addition (the floor here, the profile on the H200) ends the worker after the point was
    timed: its supervisor's reap appends the measured row, latency kept, the addition failed and measured again by
    --retry-errors; dying before the timing still leaves an error row."""

    class Died(BaseException):  # escapes every `except Exception`, as a process's death ends it
        pass

    def dies(point, device):
        raise Died

    [point] = grid_points({**GRID, "layouts": "head", "passes": "prefill", "scopes": "layer", "floor": True}, "cpu")
    run = RunDir(tmp_path / "r").create()
    monkeypatch.setattr(measurements, "floor_parts", dies)
    with pytest.raises(Died):
        run_sweep([point], run, torch.device("cpu"), FAST, worker="w")
    reap(run, "w", "killed by SIGSEGV in x.py:1 (f)")
    [row] = read_rows(run.shard("w").rows)
    assert row.status == "ok" and row.latency_ms > 0 and row.worker == "w", (row.status, row.reason)
    assert row.extra["floor_error"] == "worker w stopped while measuring it (killed by SIGSEGV in x.py:1 (f))"
    assert ADDITION_RUNNING not in row.extra and row.floor_ms is None
    assert measure_again(row, True, asked_extras([point])) == ("floor",)
    monkeypatch.setattr(measurements, "floor_parts", floor_parts)
    run_sweep([point], RunDir(tmp_path / "s").create(), torch.device("cpu"), FAST, worker="w")  # the floor is kept
    assert read_rows(RunDir(tmp_path / "s").shard("w").rows)[0].floor_ms > 0


def test_a_worker_notes_only_the_additions_its_point_asks_for(tmp_path, monkeypatch):
    """A point that asks for its floor and not its profile is noted before the floor alone: a death in the profile's
    slot (which does nothing for it) must not fail a profile it never asked for."""
    [point] = grid_points({**GRID, "layouts": "head", "passes": "prefill", "scopes": "layer", "floor": True}, "cpu")
    noted = []
    monkeypatch.setattr(sweep, "_write_current", lambda run, worker, row: noted.append(row.extra.get(ADDITION_RUNNING)))
    run_sweep([point], RunDir(tmp_path / "r").create(), torch.device("cpu"), FAST, worker="w")
    assert noted == [None, "floor"], noted


def test_a_workers_point_in_progress_is_replaced_whole(tmp_path, monkeypatch):
    """NAME.current.json is fsynced before it replaces the last noted point: a write that fails (a full disk at the
    fsync) leaves the last noted point whole and no temporary beside it."""
    run = RunDir(tmp_path / "r").create()
    first, second = (base_row(point) for point in grid_points(GRID, "cpu")[:2])
    current = run.shard("w").current
    current.parent.mkdir()  # as a worker's start makes it
    sweep._write_current(run, "w", first)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        sweep._write_current(run, "w", second)
    assert Row.from_dict(json.loads(current.read_text())).key == first.key
    assert [p.name for p in current.parent.iterdir()] == [current.name]


def test_a_worker_killed_while_writing_its_env_leaves_none_for_the_merge(tmp_path, monkeypatch):
    """A worker's NAME.env.json is replaced whole: a worker stopped while writing it (a launch's Ctrl-C or SIGTERM
    cancels its jobs whenever they are) leaves no half-written env, which the merge after the cancel could not read
    ('cannot read the env of worker ...', exit 2 instead of the interrupt's 130: seen once in CI's launch test)."""
    run = RunDir(tmp_path / "r").create()
    env = run.shard("w").env
    env.parent.mkdir()  # as a worker's start makes it

    def stopped(obj, out, **kwargs):
        out.write('{"host": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", stopped)
    with pytest.raises(KeyboardInterrupt):
        sweep._prepare_worker_env(run, "w", "s", torch.device("cpu"))
    assert list(env.parent.iterdir()) == []
    run.shard("w").rows.touch()  # the worker had started: the merge takes its shard
    assert merge(run).added == 0
    monkeypatch.undo()
    sweep._prepare_worker_env(run, "w", "s", torch.device("cpu"))
    assert json.loads(env.read_text())["device"].startswith("cpu")


def test_merge_keeps_one_row_a_key_and_leaves_live_shards(tmp_path):
    run = RunDir(tmp_path / "r").create()
    points = grid_points(GRID, "cpu")
    rows = [base_row(point) for point in points]
    for row, worker in zip(rows, ["a", "b"] * 4, strict=True):
        row.worker = worker
        append_row(run.shard(worker).rows, row)
    append_row(run.shard("b").rows, rows[0])  # merged before, then killed before its shard file went
    append_row(run.shard("live").rows, rows[1])
    for worker in ("a", "b"):
        run.shard(worker).env.write_text(json.dumps({"host": f"node-{worker}", "device": "cpu", "versions": {}}))
    holder = try_lock(run.shard("live").rows)  # a worker still writing
    merged = merge(run)
    holder.close()
    assert (merged.added, merged.duplicates, merged.busy) == (8, 1, ["live"])
    assert keys(run.path) == planned_keys()
    env = run.env()
    assert env["device"] == "cpu" and {n: w["host"] for n, w in env["workers"].items()} == {
        "a": "node-a",
        "b": "node-b",
    }
    assert run.shard_names() == ["live"]
    result = run_main("merge", str(run.path))
    assert result.returncode == 0 and "0 rows merged" in result.stdout and "1 duplicates" in result.stdout


def test_merge_keeps_one_row_a_key_of_a_run_two_sweeps_wrote(tmp_path):
    """A run that two sweeps wrote at once (before the run lock) holds keys twice: merge keeps each key's first row
    and cuts a half-written last line."""
    run = RunDir(tmp_path / "r").create()
    rows = [base_row(point) for point in grid_points(GRID, "cpu")]
    for row in [*rows, *rows[:3]]:
        append_row(run.rows_path, row)
    with open(run.rows_path, "a") as out:
        out.write('{"model": "ti')
    result = run_main("merge", str(run.path))
    assert result.returncode == 0 and "3 duplicates dropped" in result.stdout, result.stdout
    assert keys(run.path) == planned_keys() and run.rows_path.read_text().endswith("}\n")


def test_a_rerun_while_an_earlier_launchs_jobs_still_write_leaves_them_be(tmp_path):
    """A --launcher local sweep killed whole by SIGKILL leaves submitit's jobs running (their workers follow their
    job, not the sweep). The same command again leaves their shards be, in lines, with no rows to show yet; with
    another --shards it is refused: its shards would measure the same points beside them."""
    run = RunDir(tmp_path / "r").create()
    args = ["sweep", *FLAGS, "--launcher", "local", "--out", str(tmp_path), "--run", "r"]
    holder = try_lock(run.shard("shard-0-of-1").rows)  # the orphaned job's worker
    try:
        same = run_main(*args, "--shards", "1")
        other = run_main(*args, "--shards", "2")
    finally:
        holder.close()
    assert same.returncode == 0, same.stderr
    assert (
        "shard-0-of-1 is still queued or running: not submitted again" in same.stderr and "no rows yet" in same.stdout
    )
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert (
        "workers of an earlier sweep with another --shards still write" in other.stderr
        and "shard-0-of-1" in other.stderr
    )
    assert not run.rows_path.exists() and run.shard_names() == ["shard-0-of-1"]


def test_an_inline_sweep_merges_a_launchs_shards_first_and_waits_for_live_ones(tmp_path):
    """An inline sweep into a launched run: a finished worker's shard is merged first and its points not measured
    again; a shard a live worker still writes (a job of a killed --launcher local sweep) is refused in one line."""
    run = RunDir(tmp_path / "r").create()
    rows = [base_row(point) for point in grid_points(GRID, "cpu")]
    for row in rows[:7]:
        append_row(run.shard("shard-0-of-1").rows, row)
    holder = try_lock(run.shard("shard-0-of-2").rows)
    try:
        refused = run_main("sweep", *FLAGS, "--out", str(tmp_path), "--run", "r")
    finally:
        holder.close()
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "workers of an earlier sweep still write" in refused.stderr and "shard-0-of-2" in refused.stderr
    run.shard("shard-0-of-2").rows.unlink()
    resumed = run_main("sweep", *FLAGS, "--out", str(tmp_path), "--run", "r")
    assert resumed.returncode == 0 and "1 new rows, 7 already in" in resumed.stdout, resumed.stdout + resumed.stderr
    assert keys(run.path) == planned_keys() and not run.shard_names()


def test_a_cpu_launch_on_a_gpu_machine_gives_its_jobs_and_workers_no_gpu(tmp_path, monkeypatch):
    """--device cpu --launcher local where GPUs are visible: no job gets a GPU and each shard runs one worker on the
    CPU, named after its shard (not SHARD-gpuK, which would say a GPU measured rows the CPU did)."""
    given, dealt = [], []
    monkeypatch.setattr(launch_run, "visible_gpus", lambda: ["0", "1"])
    monkeypatch.setattr(cluster, "visible_gpus", lambda: ["0", "1"])
    monkeypatch.setattr(cluster, "run_local", lambda run, tasks, gpus, on_progress: given.append(gpus) or [])
    monkeypatch.setattr(cluster, "run_on_gpus", lambda task, gpus: dealt.append(gpus) or [])
    result = run_main("sweep", *FLAGS, "--device", "cpu", "--launcher", "local", "--out", str(tmp_path), "--run", "c")
    assert result.returncode == 0 and given == [[]], (result.stderr, given)
    [point] = grid_points({**GRID, "layouts": "head", "passes": "prefill", "scopes": "kernel"}, "cpu")
    for device in ("cpu", "cuda"):
        cluster.shard_job(Task(str(tmp_path / "c"), "shard-0-of-1", (point,), FAST, "", device))
    assert dealt == [[None], ["0", "1"]]


def test_the_dry_run_of_retry_errors_deals_the_error_rows(tmp_path):
    run = RunDir(tmp_path / "r").create()
    rows = [base_row(point) for point in grid_points(GRID, "cpu")]
    rows[0].status = "error"
    for row in rows:
        append_row(run.rows_path, row)
    args = ["sweep", *FLAGS, "--launcher", "local", "--out", str(tmp_path), "--run", "r", "--dry-run"]
    assert "8 points already in" in run_main(*args).stdout
    retried = run_main(*args, "--retry-errors")
    assert retried.returncode == 0 and "shard-0-of-1: 1 points" in retried.stdout, retried.stdout
    assert "7 points already in" in retried.stdout


def test_the_dry_run_prints_submitits_sbatch_array(tmp_path):
    result = run_main("sweep", *FLAGS, "--launcher", "slurm", "--shards", "3", "--slurm-partition", "gpu",
                      "--slurm-gpus-per-node", "2", "--slurm-time", "1:30:00", "--slurm-account", "lab",
                      "--out", str(tmp_path), "--run", "s", "--dry-run")  # fmt: skip
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90", "#SBATCH --partition=gpu",
                 "#SBATCH --account=lab", "-m submitit.core._submit"):  # fmt: skip
        assert line in script
    assert [line.split(":")[0] for line in script.splitlines() if line.startswith("shard-")] == [
        "shard-0-of-3", "shard-1-of-3", "shard-2-of-3"]  # fmt: skip
    assert not (tmp_path / "s").exists(), "a dry run writes nothing"


def test_the_gpus_dry_run_shows_each_workers_points(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_run, "visible_gpus", lambda: ["2", "5", "7"])
    result = run_main("sweep", *FLAGS, "--gpus", "2", "--dry-run", "--out", str(tmp_path), "--run", "d")
    assert result.returncode == 0, result.stderr
    counts = [line.split(":")[1].split()[0] for line in result.stdout.splitlines() if line.startswith("gpu")]
    assert [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("gpu")] == ["gpu2", "gpu5"]
    assert sum(map(int, counts)) == len(planned_keys()) and not (tmp_path / "d").exists()
    assert all(line.endswith(" s on an H200 from cold caches") for line in result.stdout.splitlines()[:2]), (
        "the estimate says whose seconds it counts (a CPU run of the cpu suite read about 875 s a worker for 40 s)"
    )


def test_a_rerun_leaves_shards_slurm_still_holds(tmp_path, monkeypatch):
    (tmp_path / "s" / "submitit").mkdir(parents=True)
    (tmp_path / "s" / "submitit" / "array.json").write_text(json.dumps({"shard-0-of-2": "7_0", "shard-1-of-2": "7_1"}))
    monkeypatch.setattr(cluster, "job_states", lambda run, ids: {"7_0": "COMPLETED", "7_1": "PENDING"})
    result = run_main("sweep", *FLAGS, "--launcher", "slurm", "--shards", "2", "--out", str(tmp_path), "--run", "s",
                      "--dry-run")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "shard-1-of-2 is still queued or running: not submitted again" in result.stdout
    assert [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("shard-0")] == ["shard-0-of-2"]
    assert "#SBATCH --array" not in result.stdout, "one shard left: one job, no array"


@pytest.mark.parametrize("text,minutes", [("90", 90), ("5:30", 6), ("1:30:00", 90), ("2-00", 2880), ("1-2:3:4", 1564)])
def test_slurm_time_formats(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize(
    "args,message",
    [
        (["--launcher", "local", "--shards", "0"], "--shards must be >= 1, got 0"),
        (["--gpus", "3"], "--gpus 3: this machine has 2 GPU(s) visible to torch"),
        (["--gpus", "two"], "--gpus 'two': give a number of GPUs (>= 1) or all"),
        (["--gpus", "²"], "--gpus '²': give a number of GPUs (>= 1) or all"),
        (["--launcher", "local", "--shards", "99", "--dry-run"], "--shards 99: the plan has 8 points"),
        (["--launcher", "slurm", "--slurm-time", "1h"], "--slurm-time '1h': use SLURM's formats"),
        (["--launcher", "slurm", "--slurm-partition", "gpu;rm"], "--slurm-partition 'gpu;rm': a SLURM name is"),
        (["--launcher", "pbs"], "unknown --launcher 'pbs'"),
        (["--shards", "2"], "--shards is for --launcher local or slurm"),
        (["--slurm-time", "10"], "--slurm-time is for --launcher slurm"),
        (["--gpus", "1", "--launcher", "local"], "give either --gpus"),
        (["--launcher", "local", "--crosscheck", "1"], "--crosscheck runs in a single-process sweep"),
    ],
)
def test_bad_launch_flags(tmp_path, monkeypatch, args, message):
    monkeypatch.setattr(launch_run, "visible_gpus", lambda: ["0", "1"])
    result = run_main("sweep", *FLAGS, *args, "--out", str(tmp_path))
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not any(tmp_path.iterdir()), "refused before anything is written"


def test_submitit_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` now raises ImportError
    result = run_main("sweep", *FLAGS, "--launcher", "slurm", "--dry-run", "--out", str(tmp_path))
    assert result.returncode == 2 and "pip install 'hhbench[cluster]'" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1


def test_a_slurm_run_from_a_machine_without_a_gpu_asks_for_its_name(tmp_path, monkeypatch):
    """The default run name is the GPU's: a login node without one gets one line asking for --run, no traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run_main("sweep", *FLAGS, "--launcher", "slurm", "--shards", "2", "--dry-run", "--out", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "no GPU to name the run after" in result.stderr and "give --run" in result.stderr


@pytest.mark.parametrize("asked", [None, "0"])
def test_workers_share_one_triton_cache_with_autotuning_kept(tmp_path, monkeypatch, asked):
    """The environment a worker process is started with: its GPU, this checkout first on PYTHONPATH, the launch's
    Triton cache, and autotuning results kept there (TRITON_CACHE_AUTOTUNING=1) unless the launch said otherwise."""
    started = []
    monkeypatch.setattr(local.subprocess, "Popen", lambda args, env, **kwargs: started.append(env))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    if asked is None:
        monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    else:
        monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", asked)
    task = Task(str(tmp_path / "r"), "gpu1", (), FAST, "", "cuda")
    for gpu in ("0", "1"):
        local.WorkerProcess.start(RunDir(tmp_path / "r"), task, gpu)
    assert [env["CUDA_VISIBLE_DEVICES"] for env in started] == ["0", "1"]
    assert {env["TRITON_CACHE_DIR"] for env in started} == {str(tmp_path / "triton")}
    assert {env["TRITON_CACHE_AUTOTUNING"] for env in started} == {asked or "1"}
    assert all(env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT) for env in started)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert local.visible_gpus() == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert local.visible_gpus() == ["0", "1"]


def test_a_worker_stops_where_an_error_poisoned_its_device(tmp_path, monkeypatch):
    from hhbench.bench import workloads
    from hhbench.runner import sweep as sweep_module

    real_build = workloads.build

    def faulty_build(point, *args, **kwargs):
        if len(args) == 1 and point.context == 64 and point.pass_.value == "prefill":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_build(point, *args, **kwargs)

    monkeypatch.setattr(workloads, "build", faulty_build)
    monkeypatch.setattr(sweep_module, "device_usable", lambda device: False)
    points = grid_points({**GRID, "layouts": "head", "scopes": "kernel", "passes": "prefill,decode"}, "cpu")
    run = RunDir(tmp_path / "r")
    result = run_sweep(points, run, torch.device("cpu"), FAST, worker="w")
    assert result.new == 1 and "illegal memory access" in result.poisoned
    (row,) = read_rows(run.shard("w").rows)
    assert row.status == "error" and row.worker == "w" and not run.rows_path.exists()


class FakeWorker:
    """A worker that writes the row of its first point and then dies (rows=1), or dies at once (rows=0)."""

    def __init__(self, run, task, rows):
        for point in task.points[:rows]:
            row = base_row(point)
            row.status = "ok"
            append_row(run.shard(task.name).rows, row)

    def done(self):
        return True

    def failure(self):
        return "exit status 3"

    def stop(self):
        raise AssertionError("a finished worker is not stopped")


def test_a_worker_is_started_again_while_each_start_adds_a_row(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "POLL_S", 0)
    run = RunDir(tmp_path / "r").create()
    points = tuple(grid_points(GRID, "cpu"))
    task = Task(str(run.path), "w", points, FAST, "", "cpu")
    starts = []
    failures = local.supervise(run, [task], lambda t: starts.append(t) or FakeWorker(run, t, 1))
    assert not failures and len(starts) == len(points)
    assert sorted(row.key for row in read_rows(run.shard("w").rows)) == planned_keys()
    dead = local.supervise(run, [Task(str(run.path), "x", points, FAST, "", "cpu")],
                           lambda t: FakeWorker(run, t, 0))  # fmt: skip
    assert dead == [f"worker x stopped before its first row (exit status 3); {len(points)} points left"]


def test_a_slurm_submission_without_srun_is_refused_before_the_run_exists(tmp_path, monkeypatch):
    """Refused up front: no run folder, no .lock left. (A .lock that is left, by a sweep that failed later or was
    killed, is only a file: the flock dies with its holder, and a rerun takes the run.)"""
    submitit = cluster.import_submitit()
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: -1))  # as without srun
    result = run_main("sweep", *FLAGS, "--launcher", "slurm", "--out", str(tmp_path), "--run", "s")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--launcher slurm: srun is not on PATH" in result.stderr
    assert not any(tmp_path.iterdir()), "refused before anything is written"
    stale = RunDir(tmp_path / "s").create()
    stale.lock_path.write_text("pid 999999 on gone\n")  # the lock file of a process that died
    with run_lock(stale):
        assert stale.lock_path.read_text() == f"pid {os.getpid()} on {os.uname().nodename}\n"


LOCAL_LAUNCH = ("--launcher", "local", "--shards", "2")
# --gpus 2 on the CPU: two fake GPUs (the launch's visible_gpus replaced before the command runs), two real workers
GPUS_LAUNCH = ("--gpus", "2")
FAKE_GPUS = ("-c", "import sys; from hhbench.launch import run; run.visible_gpus = lambda: ['0', '1']; "
             "from hhbench.cli.app import main; main(sys.argv[1:])")  # fmt: skip


def _launch_with_rows(tmp_path: Path, run: str, *flags: str, spread=LOCAL_LAUNCH) -> subprocess.Popen:
    """`sweep` spread as `spread` says (default --launcher local --shards 2) with FLAGS, then `flags`, into
    tmp_path/run, started in a session of its own (its process group holds the sweep, submitit's controllers and jobs,
    their workers), once its workers have written two whole rows."""
    args = ["sweep", *FLAGS, *flags, *spread, "--out", str(tmp_path), "--run", run]
    entry = FAKE_GPUS if spread == GPUS_LAUNCH else ("-m", "hhbench")
    shards = tmp_path / run / "shards"
    # SIGINT as a terminal's shell leaves it to its foreground jobs: a test run started in the background of a shell
    # without job control inherits it ignored (bash's rule for such jobs), and so would the sweep, which then ran on
    # to exit 0 through the Ctrl-C
    process = subprocess.Popen([sys.executable, *entry, *args], env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    # whole rows only: a row caught half-written would be counted, then dropped by the merge's repair
    while time.time() < deadline and sum(p.read_text().count("\n") for p in shards.glob("*.jsonl")) < 2:
        time.sleep(0.05)
    return process


def _live_in_group(group: int) -> list[str]:
    """The command lines of the live processes (zombies aside) of process group `group`, from /proc."""
    live = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            state, _, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]  # after '(comm)', which may hold spaces
            if proc.name.isdigit() and int(pgrp) == group and state != "Z":
                live.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        except (OSError, ValueError):  # gone while read, or not a process
            pass
    return live


def test_an_interrupted_local_launch_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C in a terminal (SIGINT to the whole process group: the sweep, submitit's controllers and jobs, the
    workers): one line, no traceback of any of them, exit 130; what was measured is merged."""
    process = _launch_with_rows(tmp_path, "i")
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "hhbench: interrupted; rerun the same command to resume"
    assert len(read_rows(tmp_path / "i" / "rows.jsonl")) >= 2, "what the workers measured is merged"


@pytest.mark.parametrize("spread", [LOCAL_LAUNCH, GPUS_LAUNCH], ids=["launcher-local", "gpus"])
def test_a_terminated_launch_ends_its_workers_in_one_line_and_exit_143(tmp_path, spread):
    """SIGTERM to the sweep alone (kill, timeout(1), a CI runner's time limit, systemd, a job scheduler): its jobs
    (--launcher local) or worker processes (--gpus) end as on Ctrl-C, none left writing the run or holding a GPU;
    one line, exit 143 (128 + SIGTERM); what was measured stays in the run. (A --gpus sweep died at once before, its
    workers with it: no line, no wall time, and what they had measured left in their shards until a rerun merged it.)"""
    # each point timed for 2 s: jobs left running would go on for seconds after the sweep has ended
    process = _launch_with_rows(tmp_path, "t", "--target-ms", "2000", "--max-reps", "1000000", spread=spread)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)  # not communicate: jobs left running would hold its pipes open
        deadline = time.time() + 3
        while _live_in_group(process.pid) and time.time() < deadline:
            time.sleep(0.1)
        left = _live_in_group(process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):  # what a failure leaves does not outlive the test
            os.killpg(process.pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=10)
    assert not left, f"processes of the launch left running: {left}"
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "hhbench: terminated (SIGTERM); rerun the same command to resume"
    # merged, or, where a worker was still dying as the merge ran (a job can end a moment before its workers), in
    # its shard file, which the next sweep or merge takes
    kept = [row for path in (tmp_path / "t").glob("**/*.jsonl") for row in read_rows(path)]
    assert len(kept) >= 2, "what the workers measured stays in the run"


def test_a_local_launch_gives_back_the_sigterm_handler_it_found(tmp_path):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert cluster.run_local(RunDir(tmp_path / "r").create(), [], []) == []
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_launch_profiles_again_a_failed_profile_before_its_workers_and_slurm_refuses(tmp_path, monkeypatch):
    """--retry-errors with a launcher: the failed profile of a finished row is measured again on that row by the
    launching process (workers only read rows.jsonl), in a fresh process, so that a profile that crashes again fails
    again on its row and the launch goes on; SLURM's jobs cannot, so that launch says what to run."""
    [point] = grid_points({**GRID, "layouts": "head", "passes": "decode", "scopes": "layer", "profile": True}, "cpu")
    run = RunDir(tmp_path / "r")
    monkeypatch.setattr(measurements, "profile_kernels", lambda *args, **kwargs: 1 / 0)
    [failed] = run_sweep([point], run, torch.device("cpu"), FAST).rows
    monkeypatch.undo()
    slurm = launch_run.Launch(launcher="slurm", shards=1, slurm=cluster.Slurm("", 0, 60, ""))
    with pytest.raises(UserError, match="need their profile or floor measured again"):
        launch_run.launch([point], run, torch.device("cpu"), FAST, slurm, retry=True)
    local = launch_run.Launch(launcher="local", shards=1)

    class Died(BaseException):  # the launching process's death, had it profiled the row itself
        pass

    def dies(*args, **kwargs):
        raise Died

    def crashes(command, **kwargs):  # the profile that killed a worker kills the process completing its row
        return subprocess.CompletedProcess(command, -11, "", "")

    monkeypatch.setattr(measurements, "profile_kernels", dies)
    monkeypatch.setattr(subprocess, "run", crashes)
    launched = launch_run.launch([point], run, torch.device("cpu"), FAST, local, retry=True)
    [row] = read_rows(run.rows_path)
    assert launched.completed == 1 and row.samples_ms == failed.samples_ms, "the launch goes on, the latency kept"
    assert row.extra["profile_error"] == "isolated worker killed by SIGSEGV"
    monkeypatch.undo()
    launched = launch_run.launch([point], run, torch.device("cpu"), FAST, local, retry=True)
    assert (launched.completed, launched.skipped, launched.plan) == (1, 0, [])
    [row] = read_rows(run.rows_path)
    assert "kernels" in row.extra and "profile_error" not in row.extra and row.samples_ms == failed.samples_ms
