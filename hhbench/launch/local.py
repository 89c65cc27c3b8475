"""Workers on this machine: one process per GPU (CUDA_VISIBLE_DEVICES), watched until all finish. A worker that
dies inside a point leaves that point as an error row (merge.reap); one that stops after an error poisoned its
CUDA context has that row already. Either is started again on the rest of its points, as long as each start
adds a row; one that dies before its first row (its set-up) is reported and not started again."""

import contextlib
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import hhbench
from hhbench.errors import Terminated
from hhbench.launch.merge import reap, remaining
from hhbench.launch.shards import deal
from hhbench.launch.worker import Task
from hhbench.rows.runs import RunDir

POLL_S = 0.2
# The stacks faulthandler writes as a process dies of a signal (workers start with it on: PYTHONFAULTHANDLER), as
# CPython's Python/traceback.c writes them: 'Fatal Python error: Segmentation fault', then per thread a header (the
# thread that crashed 'Current thread 0x...', others 'Thread 0x...'; 3.14 adds ' [thread name]') and its frames,
# innermost first, to a blank line. 3.14 adds "Current thread's C stack trace" after them, which these skip.
_DUMP_START = "Fatal Python error: "
_DUMP_THREAD = re.compile(r"^(?P<thread>Current thread|Thread) 0x[0-9a-fA-F]+( \[.*\])? \(most recent call first\):$")
_DUMP_FRAME = re.compile(r'^\s+File "(?P<path>[^"]+)", line (?P<line>\d+|\?\?\?) in (?P<function>\S+)')


def visible_gpus() -> list[str]:
    """The GPUs this process may give to workers, as CUDA_VISIBLE_DEVICES names them (SLURM sets it to a task's
    allocation), else 0..count-1; [] where torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    named = [name.strip() for name in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if name.strip()]
    return named[:count] if named else [str(index) for index in range(count)]


def child_env(extra: dict | None = None) -> dict:
    """This environment, with this process's hhbench first on PYTHONPATH (workers run the code that launched them,
    a checkout, not whatever hhbench the interpreter has installed) and Triton's autotuning results kept on disk
    (TRITON_CACHE_AUTOTUNING=1 unless set otherwise, Triton >= 3.4): the workers inherit one Triton cache
    (TRITON_CACHE_DIR, else Triton's ~/.triton/cache), so the first worker to tune a kernel for a tuning key saves
    the others the tuning. fla 0.6 asks for that on its own kernels already (FLA_CACHE_RESULTS, default 1); the
    switch extends it to every autotuned Triton kernel."""
    root = str(Path(hhbench.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"TRITON_CACHE_AUTOTUNING": "1", **os.environ, "PYTHONPATH": path, **(extra or {})}


class Handle(Protocol):
    """A running worker as the supervisor sees it: a child process (--gpus) or a submitit job (--launcher)."""

    def done(self) -> bool:
        """Whether the worker has ended, well or badly."""
        ...

    def failure(self) -> str | None:
        """Why the worker ended badly (one line), None when it finished."""

    def stop(self) -> None:
        """End the worker now (the launch is interrupted): its point in progress gets no row, to be measured later."""


def crash_site(log: str) -> str | None:
    """Where a process that died of a signal was, from the last stack dump faulthandler wrote to `log` (_DUMP_THREAD):
    the crashed thread's innermost frame (importlib's frozen frames passed over: a crash while importing names the
    import), and the innermost of hhbench's own files where that is another ('fla/modules/x.py:12 (f), from
    hhbench/kernels/y.py:34 (g)'). A crash in a thread without Python frames (a library's own thread) names the
    thread that ran hhbench's code instead. None without a dump (SIGKILL, an OOM kill, leaves none)."""
    threads: list[tuple[bool, list[tuple[str, str]]]] = []  # (crashed, frames: (path, 'line (function)'))
    dump = log[log.rfind(_DUMP_START) :] if _DUMP_START in log else log
    in_stack = False
    for line in dump.splitlines():
        header = _DUMP_THREAD.match(line)
        if header:
            threads.append((header["thread"] == "Current thread", []))
            in_stack = True
        elif not line.strip():
            in_stack = False
        elif in_stack and (frame := _DUMP_FRAME.match(line)):  # others ('  Garbage-collecting') are no frame
            threads[-1][1].append((frame["path"], f"{frame['line']} ({frame['function']})"))
    crashed = next((frames for current, frames in threads if current and frames), None)
    if crashed is not None:
        return _site(crashed)
    running = next((frames for _, frames in threads if any(_own_file(path) for path, _ in frames)), None)
    return None if running is None else f"a thread without Python frames, while another was in {_site(running)}"


def _site(frames: list[tuple[str, str]]) -> str:
    """A thread's innermost frame that is not importlib's, and hhbench's innermost where that is another."""
    inner = next((frame for frame in frames if not frame[0].startswith("<frozen ")), frames[0])
    own = next((frame for frame in frames if _own_file(frame[0])), None)
    site = f"{_short(inner[0])}:{inner[1]}"
    return site + (f", from {_short(own[0])}:{own[1]}" if own is not None and own != inner else "")


def _own_file(path: str) -> bool:
    return Path(path).resolve().is_relative_to(Path(hhbench.__file__).resolve().parent)


def _short(path: str) -> str:
    """A file as its import names it: hhbench/..., else relative to the longest entry of sys.path holding it (the
    workers inherit this process's: site-packages, the standard library, PYTHONPATH's folders such as /tmp/site),
    else its path below a site-packages folder, else as written."""
    file = Path(path).resolve()
    if _own_file(path):
        return str(file.relative_to(Path(hhbench.__file__).resolve().parents[1]))
    folders = [Path(entry or ".").resolve() for entry in sys.path]
    holding = [folder for folder in folders if len(folder.parts) > 1 and file.is_relative_to(folder)]
    if holding:
        return str(file.relative_to(max(holding, key=lambda folder: len(folder.parts))))
    parts = Path(path).parts
    return str(Path(*parts[parts.index("site-packages") + 1 :])) if "site-packages" in parts else path


@dataclass
class WorkerProcess:
    """A worker as a child process, its stdout and stderr in its shard log (appended to from `log_start` on)."""

    process: subprocess.Popen
    log: Path
    log_start: int = 0

    @classmethod
    def start(cls, run: RunDir, task: Task, gpu: str | None) -> "WorkerProcess":
        """Start `task` as `python -m hhbench.launch.worker` with only `gpu` visible (CUDA_VISIBLE_DEVICES; None: the
        device the task names), its task pickled and its output appended to its shard log."""
        files = run.shard(task.name)
        files.folder.mkdir(parents=True, exist_ok=True)
        files.task.write_bytes(pickle.dumps(task))
        extra = {"HHBENCH_SUPERVISOR": str(os.getpid()), "PYTHONFAULTHANDLER": "1",  # crash_site reads its dumps
                 **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}  # fmt: skip
        with open(files.log, "a") as log:
            start = log.tell()
            process = subprocess.Popen([sys.executable, "-m", "hhbench.launch.worker", str(files.task)], env=child_env(extra),
                                       stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        return cls(process, files.log, start)

    def done(self) -> bool:
        """Whether the process has exited."""
        return self.process.poll() is not None

    def stop(self) -> None:
        """Kill the process and wait for it: its point in progress gets no row (see Handle.stop)."""
        self.process.kill()
        self.process.wait()

    def failure(self) -> str | None:
        """None after exit status 0, else one line: the signal that killed it and where (crash_site), or the status
        and its log's last line."""
        code = self.process.returncode
        if code == 0:
            return None
        with open(self.log, "rb") as stream:
            stream.seek(self.log_start)
            text = stream.read().decode(errors="replace")
        if code < 0:
            site = crash_site(text)
            return f"killed by {signal.Signals(-code).name}" + (f" in {site}" if site else "")
        lines = [line for line in text.splitlines() if line.strip()]
        return f"exit status {code}: {lines[-1].strip()[:200]}" if lines else f"exit status {code}"


def worker_name(task: str, gpu: str | None) -> str:
    """The name rows and shard files carry: gpuK for GPU K of an inline --gpus launch, TASK-gpuK inside a shard,
    the task's own name (or "cpu") without a GPU."""
    if gpu is None:
        return task or "cpu"
    return f"{task}-gpu{gpu}" if task else f"gpu{gpu}"


def rows_written(run: RunDir, names: list[str]) -> int:
    """Rows in the shard files of these workers, and of their per-GPU workers (NAME-gpuK)."""
    folder = run.shard("").folder
    paths = {path for name in names for path in (run.shard(name).rows, *folder.glob(f"{name}-gpu*.jsonl"))}
    return sum(path.read_bytes().count(b"\n") for path in paths if path.exists())


def supervise(
    run: RunDir,
    tasks: list[Task],
    start: Callable[[Task], Handle],
    on_progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Run every task through `start` until its worker has finished, rows counted as they land for
    on_progress(done, total). Returns one line per worker that stopped without adding a row (its points left
    unmeasured for a rerun)."""
    total = sum(len(task.points) for task in tasks)
    names = [task.name for task in tasks]
    before = rows_written(run, names)
    started = {task.name: rows_written(run, [task.name]) for task in tasks}
    running = {task.name: (task, start(task)) for task in tasks}
    failures = []
    try:
        while running:
            time.sleep(POLL_S)
            for name, (task, handle) in list(running.items()):
                if not handle.done():
                    continue
                del running[name]
                why = handle.failure()
                if why is None:
                    continue
                reap(run, name, why)
                left = remaining(run, name, task.points)
                if left and rows_written(run, [name]) > started[name]:
                    again = replace(task, points=left)
                    started[name] = rows_written(run, [name])
                    running[name] = (again, start(again))
                elif left:
                    failures.append(f"worker {name} stopped before its first row ({why}); {len(left)} points left")
            if on_progress:
                on_progress(rows_written(run, names) - before, total)
    finally:  # interrupted (Ctrl-C, or a SIGINT to this process alone): no worker outlives its launch
        for _, handle in running.values():
            handle.stop()
    return failures


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM (kill, timeout(1), a CI runner's time limit, systemd, a scheduler) raises Terminated while inside, as
    Ctrl-C raises KeyboardInterrupt: Python's default action would end this process at once, without the `finally`
    that stops its workers (--gpus) or cancels its jobs (--launcher local, which ran on as orphans) and merges what
    they measured. Once: later ones are ignored, so that they do not cut short the stopping. The previous handler is
    back after. A SIGKILL cannot be caught: --gpus workers die with this process (their PR_SET_PDEATHSIG);
    submitit's jobs outlive it, as SLURM's outlive their submitter, and a rerun leaves their shards be
    (docs/sweeps-multi-gpu.md); PR_SET_PDEATHSIG in a job would follow its parent, submitit's controller, not this
    process."""

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_workers(
    run: RunDir, tasks: list[Task], gpus: list[str | None], on_progress: Callable[[int, int], None] | None = None
) -> list[str]:
    """One worker process per task with points, task i on GPU gpus[i] (None: the CPU), supervised. Returns
    supervise's failures."""
    gpu_of = {task.name: gpu for task, gpu in zip(tasks, gpus, strict=True)}
    busy = [task for task in tasks if task.points]
    return supervise(run, busy, lambda task: WorkerProcess.start(run, task, gpu_of[task.name]), on_progress)


def run_on_gpus(task: Task, gpus: list[str | None]) -> list[str]:
    """`task`'s points dealt by estimated cost (shards.deal) over `gpus` and run there, one worker each; the
    worker on GPU K is named TASK-gpuK (gpuK for an unnamed task), the one on the CPU TASK (cpu)."""
    parts = deal(list(task.points), len(gpus), task.policy)
    tasks = [replace(task, name=worker_name(task.name, gpu), points=part.points)
             for gpu, part in zip(gpus, parts, strict=True)]  # fmt: skip
    return run_workers(RunDir(Path(task.run)), tasks, gpus)
