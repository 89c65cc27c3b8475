"""The hhbench command run inside the test process: what `python -m hhbench` does, without paying for a new
interpreter and its imports on every call (the subprocess form stays for the tests of the real entry point)."""

import contextlib
import io
import os
from dataclasses import dataclass
from unittest import mock

from hhbench.cli.app import main


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_main(*args: str, env: dict | None = None) -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), mock.patch.dict(os.environ, env or {}):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())
