"""Kernel by kernel: what one call runs, under torch.profiler, apart from its timing (the profiler's overhead never
reaches a timed latency).

On CUDA each kernel (and memcpy / memset) is a device event of its own: its device time is the kernel's duration.
On the CPU there are no kernels; the aten operators are, and each one's self time (its time less the operators it
calls) stands for its kernel, so that nested operators (linear > matmul > mm) are not counted twice. Times are
microseconds as torch.profiler gives them, turned into ms here.

Each kernel's time is also split by where hhbench launched it: the innermost hhbench function above the operator
that launched it (on CUDA, the operator or range the kernel's correlation id links it to; a kernel launched outside
any, has none and counts under `?`), so that glue kernels of generic names (a copy, an elementwise op) say which
function of the layer they are. hhbench's functions are marked by ranges of their own while the call is profiled
(_hhbench_ranges), named as torch.profiler's `with_stack` names a Python frame (its file and first line), instead of
with_stack: profiles with it died of SIGSEGV on an H200 (torch 2.11: every point of a --profile sweep, a training
step in results/gpu-tests-h200/call-6) where profiles without it on the same machine did not
(results/layer-overhead-h200), as with_stack has crashed elsewhere (pytorch/pytorch#56008, #155146).
"""

import contextlib
import functools
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    sites: dict[str, dict[str, float]] = field(default_factory=dict)  # kernel -> launch site -> ms

    def add(self, name: str, ms: float, launches: int) -> None:
        """Add `launches` launches of kernel `name` taking `ms` in all."""
        self.ms[name] = self.ms.get(name, 0.0) + ms
        self.launches[name] = self.launches.get(name, 0) + launches

    def add_site(self, name: str, site: str, ms: float) -> None:
        """Add `ms` of kernel `name` launched from `site` (launch_site)."""
        by_site = self.sites.setdefault(name, {})
        by_site[site] = by_site.get(site, 0.0) + ms


# A range's name (_range_name: as with_stack names a Python frame): "<path>(<first line>): <function>"
_FRAME = re.compile(r"^(?P<path>.+)\((?P<line>\d+)\): (?P<function>.+)$")
UNKNOWN_SITE = "?"
# The hhbench package's folder: a frame is hhbench's when its file is in it, not when its path merely holds
# "hhbench/" (a checkout named hhbench holds its .venv, torch's files among them: scripts/setup.sh's layout)
_PACKAGE = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=4096)
def _package_module(path: str) -> str | None:
    """`path`'s "hhbench/<module>.py" where it is a file of the hhbench package, else None."""
    try:
        return "hhbench/" + Path(path).resolve().relative_to(_PACKAGE).as_posix()
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _range_name(code) -> str | None:
    """A Python function's range name as with_stack names its frame, "<path>(<first line>): <function>", where it is
    hhbench's; None for any other code."""
    return f"{code.co_filename}({code.co_firstlineno}): {code.co_name}" if _package_module(code.co_filename) else None


@contextlib.contextmanager
def _hhbench_ranges():
    """While inside: each call of an hhbench function on this thread opens a profiler range of _range_name's name
    (torch's _RecordFunctionFast: a fraction of a microsecond, where the record_function operator takes tens, which a
    decode step's 70 hhbench calls would add to the profiled step), closed when the call returns (raising or not), so
    that launch_site finds it above the operators the call launched. sys.setprofile sees every Python call, so the
    calls it profiles run slower on the host; their kernels do not. Autograd's backward threads (on CUDA) are not
    traced: their kernels are traced through their backward nodes. Where a profiler written in C holds the hook
    already (cProfile's), which Python can neither call nor put back, nothing is marked."""
    previous = sys.getprofile()
    if previous is not None and not callable(previous):
        yield
        return
    open_range = torch._C._profiler._RecordFunctionFast
    ranges = []  # one per call seen, None for a function not hhbench's: calls and returns pair off

    def trace(frame, event, arg):
        if event == "call":
            name = _range_name(frame.f_code)
            marked = open_range(name) if name else None
            if marked is not None:
                marked.__enter__()
            ranges.append(marked)
        elif event == "return" and ranges:  # the returns of the frames open when tracing began are no calls' pair
            marked = ranges.pop()
            if marked is not None:
                marked.__exit__(None, None, None)

    sys.setprofile(trace)
    try:
        yield
    finally:
        sys.setprofile(previous)
        for marked in reversed(ranges):  # calls still open (this generator's own resumption): closed, inner first
            if marked is not None:
                marked.__exit__(None, None, None)


def launch_site(event, forward: dict | None = None) -> str:
    """The innermost hhbench function above a profiler event, "hhbench/<module>.py:<first line> <function>", walking
    its CPU parents; UNKNOWN_SITE where none is (an event under no hhbench function's range), or
    where the walk leaves the profiled call for profile_kernels' own frame (the profiler's ProfilerStep# range).
    Under an autograd backward node found in `forward` (_forward_ops: sequence number -> forward operator), the
    site of the forward operator it differentiates, with " backward"."""
    while event is not None:
        op = forward.get(event.sequence_nr) if forward and getattr(event, "fwd_thread", 0) else None
        if op is not None:  # a backward node (it records the forward's thread): its forward operator's site
            site = launch_site(op)
            return site if site == UNKNOWN_SITE else f"{site} backward"
        frame = _FRAME.match(event.name)
        module = frame and _package_module(frame["path"])
        if module == _package_module(__file__):
            break
        if module:
            return f"{module}:{frame['line']} {frame['function']}"
        event = event.cpu_parent
    return UNKNOWN_SITE


def _operators(events):
    """The CPU operators among a profile's events that stand for kernels on the CPU: aten operators with time of
    their own; annotated ranges (record_function's) and hhbench's functions' ranges (_hhbench_ranges: named as
    _FRAME reads, which no operator is) left out, whose self time is Python's."""
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU or _FRAME.match(event.name):
            continue
        if not getattr(event, "is_user_annotation", False) and event.self_cpu_time_total > 0:
            yield event


def _kernel_events(profiler, device: torch.device):
    """(name, total ms, launches) of each kernel of a profile: its device events from key_averages() on CUDA,
    annotated ranges (record_function's, the profiler's own ProfilerStep#) left out, which span kernels counted
    already; the operators' self time on the CPU (module docstring)."""
    if device.type == "cuda":
        for event in profiler.key_averages():
            if event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False):
                continue
            if event.device_time_total > 0:  # a kernel nests nothing: its device time is its own
                yield event.key, event.device_time_total / 1e3, event.count
        return
    totals: dict[str, list] = {}
    for event in _operators(profiler.events()):
        total = totals.setdefault(event.name, [0.0, 0])
        total[0] += event.self_cpu_time_total / 1e3
        total[1] += 1
    for name, (ms, launches) in totals.items():
        yield name, ms, launches


def _forward_ops(events) -> dict:
    """Autograd's sequence number -> the forward operator that recorded it (a backward node records the same number
    and its forward's thread: a backward kernel is traced through it to the forward function it differentiates)."""
    forward = {}
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CPU and event.sequence_nr >= 0 and not event.fwd_thread:
            forward.setdefault(event.sequence_nr, event)
    return forward


def _sites(events, device: torch.device):
    """(kernel name, launch site, ms) of each kernel launch among a profile's events (module docstring)."""
    forward = _forward_ops(events)
    if device.type != "cuda":
        for event in _operators(events):
            yield event.name, launch_site(event, forward), event.self_cpu_time_total / 1e3
        return
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CPU:  # an operator, or a range if one holds kernels
            for kernel in event.kernels:
                yield kernel.name, launch_site(event, forward), kernel.duration / 1e3


def profile_kernels(
    fn: Callable[[], object],
    device: torch.device,
    steps: int,
    before: Callable[[], None] | None = None,
    warm: int = 0,
) -> KernelTimes:
    """`steps` calls of `fn` profiled (CUDA activity on a GPU, CPU activity on the CPU; hhbench's functions as ranges
    for the launch sites), each in its own profiler cycle so that `before` (an L2 flush, say), run ahead of each call, is never
    recorded; `warm` unprofiled calls first, so that the profile is of the steady call (compiles and autotuning
    done)."""
    for _ in range(warm):
        fn()
    found = KernelTimes(steps, 0.0)

    def collect(profiler) -> None:
        for name, ms, launches in _kernel_events(profiler, device):
            found.add(name, ms, launches)
        for name, site, ms in _sites(profiler.events(), device):
            found.add_site(name, site, ms)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    cycles = schedule(wait=0, warmup=1, active=1, repeat=steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    profiler = profile(activities=activities, schedule=cycles, on_trace_ready=collect)
    with warnings.catch_warnings(), profiler:
        # each cycle's events are collected as it ends, which is what the warning is about
        warnings.filterwarnings("ignore", message=".*Profiler clears events at the end of each cycle")
        for _ in range(steps):
            if before is not None:
                before()
            sync()
            profiler.step()  # warming up (before() not kept) -> recording
            start = time.perf_counter()
            with _hhbench_ranges():
                fn()
            sync()
            found.step_ms += (time.perf_counter() - start) * 1e3
            profiler.step()  # recording -> this cycle's trace collected
    for name, total in found.ms.items():  # kernels no operator holds (on CUDA, one launched from Python) count as ?
        left = total - sum(found.sites.get(name, {}).values())
        if left > 1e-3 * total:
            found.add_site(name, UNKNOWN_SITE, left)
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
