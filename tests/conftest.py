import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in its interpreter; read when triton loads
torch.set_num_threads(1)  # the tests' tensors are small: one thread is faster and steadier on a shared CPU


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    """With HHBENCH_INSTAFAIL=1 (experiments/h200/gpu-tests.sh) a failure's traceback is printed when it happens, as
    pytest-instafail does (absent on the device machines): a run that its device call's time limit kills never
    reaches pytest's report at the end."""
    if report.failed and os.environ.get("HHBENCH_INSTAFAIL") == "1":
        print(f"\n{report.nodeid} ({report.when}):\n{report.longreprtext}", flush=True)


@pytest.fixture(autouse=True, scope="module")
def _frozen_heap():
    """What each test file finds alive (the modules imported so far: torch, lm-eval, transformers) frozen out of
    Python's collector, its garbage collected first: full collections inside the tests (a sweep's between its
    points, eval's between models) then walk what the file's tests made, not the suite's heap, which reached 700,000
    objects and 0.65 s a collection (the floor test's 86 took 61 s)."""
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config):
    """The heap unfrozen before the interpreter exits, so that its shutdown collects it: left frozen, triton's
    nanobind bindings reported hundreds of leaked types and functions on stderr."""
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m hhbench ARGS` as a user would, from a shell."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hhbench", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture
def cli():
    return run_cli
