"""Who may write a run: one sweep at a time holds the run (RUN/.lock), one worker at a time holds a shard (its
rows file). Both are flock(2) locks, which the kernel drops when their holder dies, so a killed sweep or worker
never leaves its run locked. (On a cluster, RUN must be on a file system with flock: NFSv4, Lustre with -o
flock, GPFS.)"""

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from hhbench.errors import UserError
from hhbench.rows.runs import RunDir


def try_lock(path: Path) -> IO | None:
    """`path` (made if missing) opened and locked for this process, or None while another holds it; the lock
    lasts until the returned file is closed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


@contextlib.contextmanager
def run_lock(run: RunDir) -> Iterator[None]:
    """Hold the run while this sweep (or merge) writes it. Raises UserError, naming the holder, while another
    process holds it."""
    run.create()
    handle = try_lock(run.lock_path)
    if handle is None:
        holder = run.lock_path.read_text().strip() or "another process"
        raise UserError(
            f"run {run.path} is being written by another hhbench process ({holder}): wait for it or use another --run"
        )
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        handle.close()
