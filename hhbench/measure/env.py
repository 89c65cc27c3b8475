"""The environment a run was measured in, recorded in env.json beside its rows."""

import datetime
import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

from hhbench.errors import UserError

PACKAGES = ("torch", "triton", "fla-core", "flash-linear-attention", "flash-attn", "flash-qla", "tilelang",
            "lm-eval", "transformers", "numpy", "pandas")  # fmt: skip


def pick_device(text: str) -> torch.device:
    """The --device of every command: "auto" (CUDA where torch sees a GPU, else the CPU), "cpu" or "cuda".
    Raises UserError (one line) for another name, or for "cuda" on a machine whose torch sees no GPU."""
    name = text.strip().lower()
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {text!r}: choose auto, cpu or cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch on this machine")
    return torch.device(name)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        module = package.replace("-core", "").replace("-", "_")
        try:
            return getattr(__import__(module), "__version__", None)
        except Exception:  # a broken optional package must not stop the record
            return None


def _git_commit() -> str | None:
    """The checkout's commit; HHBENCH_COMMIT where the tree is a copy without .git (the lent GPU machines)."""
    if os.environ.get("HHBENCH_COMMIT"):
        return os.environ["HHBENCH_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _nvidia_smi() -> dict:
    fields = (
        "name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu"
    )
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode or not out.stdout.strip():
        return {}
    values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields.split(","), values, strict=False))


def device_name() -> str:
    """The device rows name: the first CUDA GPU's name, else "cpu (<processor>, <n> threads)"."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def capture_env(extra: dict | None = None) -> dict:
    """The environment of a run for env.json: time (UTC), host, platform, versions of PACKAGES, hhbench commit,
    device, CUDA and the GPU's properties, updated with `extra`."""
    env = {
        "schema": 1,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_threads": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hhbench_commit": _git_commit(),
        "versions": {name: _version(name) for name in PACKAGES},
        "device": device_name(),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "nvidia_smi": _nvidia_smi(),
        }
        env["cudnn"] = torch.backends.cudnn.version()
    env.update(extra or {})
    return env


def measure_peaks(device: str = "cuda") -> dict:
    """The two ceilings of the card as found: a bf16 8192^3 matmul and a 2 GiB device-to-device copy (bytes read
    plus written), each the median of 20 CUDA-event timings on random data after warm-up."""
    if device != "cuda" or not torch.cuda.is_available():
        return {}
    import statistics

    def median_ms(fn, reps=20):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul_ms = median_ms(lambda: a @ b)
    src = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    return {
        "bf16_matmul_tflops": 2 * n**3 / (matmul_ms * 1e-3) / 1e12,
        "copy_gbps": nbytes / (copy_ms * 1e-3) / 1e9,
        "method": "median of 20 CUDA-event timings after 3 warm-ups: bf16 8192^3 matmul; 1 GiB copy, read+write bytes",
    }
