"""Timing one callable the way METHOD.md asks: the first call (compile, JIT, autotune) timed on its own; warm-up;
then repeated samples with CUDA events (or perf_counter on the CPU), L2 flushed (by a read) before each sample so short
kernels are not timed out of a warm cache; optionally the callable captured in a CUDA graph and its replays
timed (small decode steps are otherwise dominated by launch overhead). Median and p10/p90 of the samples."""

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hhbench.errors import UserError


@dataclass(frozen=True)
class TimingPolicy:
    warmup_ms: float = 100.0  # warm-up budget after the first call
    target_ms: float = 1000.0  # total timed budget; the sample count follows from it
    min_reps: int = 10
    max_reps: int = 200
    flush_l2: bool = True
    graph: bool = False  # capture in a CUDA graph and time replays (CUDA only)

    def __post_init__(self):
        """Every option checked for type and range, wherever it comes from (flags, a suite's [timing], code)."""
        for option in dataclasses.fields(self):
            value, kind = getattr(self, option.name), type(option.default)
            if kind not in _EXPECTED:
                continue
            number = isinstance(value, int | float) and not isinstance(value, bool)
            ok = isinstance(value, bool) if kind is bool else number and (kind is float or isinstance(value, int))
            if not ok:
                raise UserError(f"timing option {option.name} must be {_EXPECTED[kind]}, got {value!r}")
            least = 1 if option.name == "min_reps" else 0
            if kind is not bool and not (math.isfinite(value) and value >= least):
                raise UserError(f"timing option {option.name} must be a finite number >= {least}, got {value}")
        if self.max_reps < self.min_reps:
            raise UserError(f"timing option max_reps ({self.max_reps}) must be >= min_reps ({self.min_reps})")


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number"}


@dataclass
class Timing:
    samples_ms: list[float]
    timer: str  # cuda-events | cuda-graph | perf_counter
    compile_ms: float
    notes: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.samples_ms)
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class _L2Flusher:
    """Reads a buffer twice the L2's size, so every sample starts with a cold cache as a real workload would.

    Reading, not writing: zeroing the buffer (what triton's do_bench does) leaves the L2 full of dirty lines, and the
    timed kernel then pays for writing them back. On an H100 that added 8-10 us to a 4-head decode step at 32K
    (45 us with clean lines; results/gpu-targets-h100/README.md)."""

    _buffers: dict = {}

    @classmethod
    def flush(cls, device: torch.device) -> None:
        buffer = cls._buffers.get(device)
        if buffer is None:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20) or 64 * 2**20
            buffer = cls._buffers[device] = torch.ones(2 * l2 // 4, dtype=torch.int32, device=device)
        buffer.max()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _capture(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # graph capture wants a warmed-up callable on a side stream
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_callable(fn: Callable[[], object], device: torch.device, policy: TimingPolicy = TimingPolicy()) -> Timing:
    compile_ms = _timed_call(fn, device)
    notes = []
    run = fn
    timer = "perf_counter" if device.type != "cuda" else "cuda-events"
    if policy.graph and device.type == "cuda":
        run, timer = _capture(fn, device), "cuda-graph"
    # Warm up for the budget, and learn how long one call takes to size the sample count.
    warm, spent = 0, 0.0
    while spent < policy.warmup_ms or warm < 2:
        spent += _timed_call(run, device)
        warm += 1
        if warm >= 1000:
            break
    per_call = max(spent / warm, 1e-3)
    reps = int(min(policy.max_reps, max(policy.min_reps, policy.target_ms / per_call)))
    if device.type == "cuda":
        flush = policy.flush_l2
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            if flush:
                _L2Flusher.flush(device)
            start.record()
            run()
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) for start, end in events]
        if flush:
            notes.append("L2 flushed by a read before each sample")
    else:
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            run()
            samples.append((time.perf_counter() - start) * 1e3)
    return Timing(samples, timer, compile_ms, notes)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated bytes above what was allocated before the call; None on the CPU (not measured there)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - base)


def time_each(parts: dict[str, Callable[[], object]], device: torch.device, policy: TimingPolicy) -> dict[str, float]:
    """The median ms of each callable timed alone, under the same policy (parts of a point: kernel scope's FA and
    GDN alone, or a floor's kernels)."""
    return {name: time_callable(fn, device, policy).median_ms for name, fn in parts.items()}
