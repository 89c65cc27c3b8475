"""Kernel by kernel: what one call runs, under torch.profiler, apart from its timing (the profiler's overhead never
reaches a timed latency).

On CUDA each kernel (and memcpy / memset) is a device event of its own: its device time is the kernel's duration.
On the CPU there are no kernels; the aten operators are, and each one's self time (its time less the operators it
calls) stands for its kernel, so that nested operators (linear > matmul > mm) are not counted twice. Times are
microseconds as torch.profiler gives them, turned into ms here.
"""

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile, schedule


@dataclass
class KernelTimes:
    """Per kernel name, its device time (ms) and launches summed over `steps` profiled calls, and the calls' own
    time (ms, summed: wall time from the first launch to the device's end, under the profiler)."""

    steps: int
    step_ms: float
    ms: dict[str, float] = field(default_factory=dict)
    launches: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, ms: float, launches: int) -> None:
        """Add `launches` launches of kernel `name` taking `ms` in all."""
        self.ms[name] = self.ms.get(name, 0.0) + ms
        self.launches[name] = self.launches.get(name, 0) + launches


def _kernel_events(averages, device: torch.device):
    """(name, total ms, launches) of each kernel in key_averages(): device events on CUDA, operators' self time on
    the CPU (module docstring); names with no time of their own (wrappers, views) left out, and so are annotated
    ranges (record_function's, the profiler's own ProfilerStep#), which on CUDA span kernels counted already."""
    wanted = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    for event in averages:
        if event.device_type != wanted or getattr(event, "is_user_annotation", False):
            continue
        # a kernel nests nothing: its device time is its own
        us = event.device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if us > 0:
            yield event.key, us / 1e3, event.count


def profile_kernels(
    fn: Callable[[], object],
    device: torch.device,
    steps: int,
    before: Callable[[], None] | None = None,
    warm: int = 0,
) -> KernelTimes:
    """`steps` calls of `fn` profiled (CUDA activity on a GPU, CPU activity on the CPU), each in its own profiler
    cycle so that `before` (an L2 flush, say), run ahead of each call, is never recorded; `warm` unprofiled calls
    first, so that the profile is of the steady call (compiles and autotuning done)."""
    for _ in range(warm):
        fn()
    found = KernelTimes(steps, 0.0)

    def collect(profiler) -> None:
        for name, ms, launches in _kernel_events(profiler.key_averages(), device):
            found.add(name, ms, launches)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    cycles = schedule(wait=0, warmup=1, active=1, repeat=steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    with warnings.catch_warnings(), profile(activities=activities, schedule=cycles, on_trace_ready=collect) as profiler:
        # each cycle's events are collected as it ends, which is what the warning is about
        warnings.filterwarnings("ignore", message=".*Profiler clears events at the end of each cycle")
        for _ in range(steps):
            if before is not None:
                before()
            sync()
            profiler.step()  # warming up (before() not kept) -> recording
            start = time.perf_counter()
            fn()
            sync()
            found.step_ms += (time.perf_counter() - start) * 1e3
            profiler.step()  # recording -> this cycle's trace collected
    return found


def kernel_kinds(launches: dict[str, float], floor_launches: dict[str, float]) -> dict[str, str]:
    """Each kernel name's kind, by what the floor's parts launch (launches per layer, both): `floor` where the parts
    launch that name at least as often as the step does (every launch can be one of theirs), `shared` where they
    launch it less often (some launches are the parts', the rest glue: a generic copy, say), `rest` where no part
    launches it. By name only: a necessary kernel the step runs under another name than its part (another GEMM
    tile for another shape) counts as rest, never the other way round."""
    kinds = {}
    for name, count in launches.items():
        theirs = floor_launches.get(name, 0.0)
        kinds[name] = "rest" if not theirs else "floor" if count <= theirs * (1 + 1e-9) else "shared"
    return kinds
