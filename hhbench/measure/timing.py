"""Timing one callable the way METHOD.md asks: the first call (compile, JIT, autotune) timed on its own; warm-up
until timings settle (bounded); then repeated samples, as many as the settled call time fits in the budget, with
CUDA events (or perf_counter on the CPU), L2 flushed (by a read) before each sample so short kernels are not
timed out of a warm cache; optionally the callable captured in a CUDA graph and its replays
timed (small decode steps are otherwise dominated by launch overhead). Median and p10/p90 of the samples, settled
ones only: samples slower than the level they end at (a warm-up leftover, a level shift later in them) are
dropped and taken again, a bounded number of times, after which a note says they had not settled."""

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
    """How a point is timed: warm-up and timed budgets (ms), the sample count's bounds, L2 flush between samples,
    CUDA-graph capture. Raises UserError (one line) for an option of the wrong type or range."""

    warmup_ms: float = 100.0  # warm-up budget after the first call; warm-up goes on (bounded) until timings settle
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
    """Timed samples (ms) of one point, the timer that took them, the first call's time (compile_ms, ms) and notes."""

    samples_ms: list[float]
    timer: str  # cuda-events | cuda-graph | perf_counter
    compile_ms: float
    notes: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        """Median of the samples, ms."""
        return statistics.median(self.samples_ms)

    def percentile(self, q: float) -> float:
        """The q-quantile (0 <= q <= 1) of the samples, ms, linearly interpolated between order statistics."""
        ordered = sorted(self.samples_ms)
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class L2Flusher:
    """Reads a buffer twice the L2's size, so every sample starts with a cold cache as a real workload would.

    Reading, not writing: zeroing the buffer (what triton's do_bench does) leaves the L2 full of dirty lines, and the
    timed kernel then pays for writing them back. On an H100 that added 8-10 us to a 4-head decode step at 32K
    (45 us with clean lines; results/gpu-targets-h100/README.md)."""

    _buffers: dict = {}

    @classmethod
    def flush(cls, device: torch.device) -> None:
        """Read the device's flush buffer (made once, twice the L2's size): the L2 holds clean, unrelated lines."""
        buffer = cls._buffers.get(device)
        if buffer is None:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20) or 64 * 2**20
            buffer = cls._buffers[device] = torch.ones(2 * l2 // 4, dtype=torch.int32, device=device)
        buffer.max()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Clock = Callable[[], float]  # seconds, monotonic (time.perf_counter; tests pass a fake one)

# Warm-up has settled when the median of the last WINDOW calls is no more than SETTLE_TOLERANCE below the median
# of the WINDOW calls before it (timings have stopped falling: JIT, autotune, caches and clocks have warmed up).
WINDOW = 5
SETTLE_TOLERANCE = 0.10
WARMUP_BOUND = 10  # warm-up stops unsettled after this many times its budget (and after MAX_WARMUP_CALLS)
MAX_WARMUP_CALLS = 1000


def _timed_call(fn: Callable[[], object], device: torch.device, clock: Clock = time.perf_counter) -> float:
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return (clock() - start) * 1e3


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


def settled(times: list[float]) -> bool:
    """Whether a series of call times (ms, in call order) has stopped falling: the median of its last WINDOW is
    at least (1 - SETTLE_TOLERANCE) times the median of the WINDOW before. False with fewer than 2 * WINDOW."""
    if len(times) < 2 * WINDOW:
        return False
    before, last = times[-2 * WINDOW : -WINDOW], times[-WINDOW:]
    return statistics.median(last) >= (1 - SETTLE_TOLERANCE) * statistics.median(before)


def transient(samples: list[float]) -> int:
    """How many leading samples are slower than where the series ends: those before the first WINDOW whose median
    is within SETTLE_TOLERANCE of the last WINDOW's median (the latest level), and any still above that band right
    after it. A level shift anywhere in the series counts (a warm-up that settled on a plateau the samples then
    left); a rise does not. 0 with fewer than 2 * WINDOW samples (too few to tell a transient from noise)."""
    if len(samples) < 2 * WINDOW:
        return 0
    ceiling = (1 + SETTLE_TOLERANCE) * statistics.median(samples[-WINDOW:])
    first = next(k for k in range(len(samples)) if statistics.median(samples[k : k + WINDOW]) <= ceiling)
    while samples[first] > ceiling:
        first += 1
    return first


def _warm_up(run: Callable[[], object], device: torch.device, policy: TimingPolicy, clock: Clock) -> list[float]:
    """Call `run` for at least the warm-up budget, then on until its timings settle, at most WARMUP_BOUND times
    the budget (and MAX_WARMUP_CALLS calls); the call times (ms)."""
    times: list[float] = []
    spent = 0.0
    while len(times) < MAX_WARMUP_CALLS:
        times.append(_timed_call(run, device, clock))
        spent += times[-1]
        if (
            spent >= policy.warmup_ms
            and len(times) >= 2
            and (settled(times) or spent >= WARMUP_BOUND * policy.warmup_ms)
        ):
            break
    return times


def _sample(run: Callable[[], object], device: torch.device, reps: int, flush: bool, clock: Clock) -> list[float]:
    """`reps` timed calls (ms): CUDA events around each (after an L2 flush when `flush`), else the clock."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            if flush:
                L2Flusher.flush(device)
            start.record()
            run()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    samples = []
    for _ in range(reps):
        start = clock()
        run()
        samples.append((clock() - start) * 1e3)
    return samples


def _reps(policy: TimingPolicy, per_call_ms: float) -> int:
    return int(min(policy.max_reps, max(policy.min_reps, policy.target_ms / max(per_call_ms, 1e-3))))


def time_callable(
    fn: Callable[[], object],
    device: torch.device,
    policy: TimingPolicy = TimingPolicy(),
    clock: Clock = time.perf_counter,
) -> Timing:
    """Times `fn` (see the module's doc): the first call alone, warm-up until timings settle, then samples sized
    from the settled calls, and topped up where the settled samples say more fit the budget. Samples slower than
    the level the samples end at (a warm-up that settled on a plateau; see `transient`) are dropped and taken
    again, until none is (at most WARMUP_BOUND times), so that median and spread come from settled samples only;
    Timing.notes says when samples were dropped, when the warm-up hit its bound unsettled, and when the samples
    had still not settled at theirs (then kept as they are). `clock` (seconds) times the calls where CUDA events
    do not."""
    compile_ms = _timed_call(fn, device, clock)
    notes = []
    run = fn
    timer = "perf_counter" if device.type != "cuda" else "cuda-events"
    if policy.graph and device.type == "cuda":
        run, timer = _capture(fn, device), "cuda-graph"
    flush = policy.flush_l2 and device.type == "cuda"
    warm = _warm_up(run, device, policy, clock)
    if len(warm) >= 2 * WINDOW and not settled(warm):
        notes.append(f"timings had not settled when warm-up stopped at its bound ({len(warm)} calls)")
    samples = _sample(run, device, _reps(policy, statistics.median(warm[-WINDOW:])), flush, clock)
    dropped = 0
    for rounds in range(WARMUP_BOUND + 1):
        leading = transient(samples)
        # sized again from the settled samples: a warm-up window that still held slow calls sized too few
        reps = max(len(samples), _reps(policy, statistics.median(samples[leading:])))
        if not leading and reps == len(samples):
            break
        if rounds == WARMUP_BOUND:  # still falling after as many re-samplings as warm-up had budgets: say so
            notes.append(f"timings had not settled after {rounds} re-samplings: the samples start slower than they end")
            break
        samples = samples[leading:] + _sample(run, device, reps - len(samples) + leading, flush, clock)
        dropped += leading
    if dropped:
        notes.append(f"{dropped} leading samples of a warm-up transient dropped and taken again")
    if flush:
        notes.append("L2 flushed by a read before each sample")
    return Timing(samples, timer, compile_ms, notes)


HOST_CALLS = 5  # calls whose issue time host_ms takes the median of


def host_ms(fn: Callable[[], object], device: torch.device, calls: int = HOST_CALLS) -> float | None:
    """Median host time (ms) to issue one call of `fn` on an idle CUDA device: its Python and kernel-launch cost,
    the clock stopped when `fn` returns, before its kernels finish. Where it reaches the step's latency the step is
    host-bound (the GPU waits for launches; the tables call it so from 90% of it, hhbench.tables.host): eager glue,
    not kernels, sets its time. A step that synchronizes inside counts the wait too. None on the CPU (there host and
    device time are one)."""
    if device.type != "cuda":
        return None
    times = []
    for _ in range(calls):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize(device)
    return statistics.median(times)


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
