"""Reading and writing files the user names: every command writes through `open_output` and `make_folder`,
which say in one line what is wrong with a path that cannot be written (a file where a folder must be, a
folder where a file must be, a read-only folder); `replace_whole` (a text file) and `replacing` (a path, for
writers that take one) replace a file so that a kill while writing leaves the old one, and `run_folder` keeps a
run name inside --out."""

import contextlib
import json
import os
import tempfile
from pathlib import Path

from hhbench.errors import UserError


def _problem(path: Path, exc: OSError, folder: bool) -> str:
    """Why `path` (a file to write, or a folder with folder=True) could not be written: the first existing
    place on the way that is not a writable folder, else the system's reason."""
    if folder and path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    if not folder and path.is_dir():
        return f"{path} is a folder, not a file"
    for ancestor in (path.parent, *path.parent.parents):
        if ancestor.is_dir():
            break
        if ancestor.exists() or ancestor.is_symlink():
            return f"{ancestor} is a file, not a folder" if ancestor.exists() else f"{ancestor} is a broken link"
    if isinstance(exc, PermissionError):
        return "permission denied (a folder on the way is not writable)"
    return exc.strerror or str(exc)


def open_output(path: str | Path, mode: str):
    """Open a file for writing, making its folder; an unwritable path is the user's error, in one line that
    says what is wrong with it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, mode)
    except OSError as exc:
        raise _cannot_write(path, exc) from None


def _cannot_write(path: Path, exc: OSError) -> UserError:
    """The user's error for a file that could not be written: its path and what is wrong with it."""
    return UserError(f"cannot write {path}: {_problem(path, exc, folder=False)}")


@contextlib.contextmanager
def replacing(path: str | Path):
    """Yield the path of a temporary file beside `path` (path + ".tmp", made empty) for the block to write, for writers
    that take a path (torch.save, safetensors); when the block ends the temporary is fsynced and renamed over `path`
    (os.replace), so that a kill or an error while writing leaves the old file. An error in the block, or at the
    fsync, removes the temporary and is raised; an unwritable path is the user's error, in one line, as open_output
    says it."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        open(temporary, "w").close()
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    try:
        yield temporary
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    try:
        os.replace(temporary, path)
    except OSError as exc:  # a folder where the file must be
        temporary.unlink(missing_ok=True)
        raise _cannot_write(path, exc) from None


@contextlib.contextmanager
def replace_whole(path: str | Path):
    """Open a file (text, "w") whose contents replace `path` whole when the block ends, through `replacing`: a kill or
    an error while writing leaves the old file, and no temporary where an error ended the write. An unwritable path
    is the user's error, in one line, as open_output says it."""
    with replacing(path) as temporary, open(temporary, "w") as out:
        yield out


def make_folder(path: str | Path) -> Path:
    """Make a folder (and its parents) and check that files can be written in it, before any work starts. The probe
    file is one of its own (tempfile's): a launch's workers check the run folder side by side."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"cannot write into {path}: {_problem(path, exc, folder=True)}") from None
    return path


def run_folder(out: str | Path, run: str) -> Path:
    """OUT/RUN, where RUN is one plain folder name: never absolute, never '..' or '.', no path separator, so
    that a run stays inside --out."""
    if not run.strip() or run in (".", "..") or "/" in run or "\\" in run or Path(run).is_absolute():
        raise UserError(f"bad run name {run!r}: one folder name inside --out, without '/', '\\' or '..'")
    return Path(out) / run


def read_text(path: str | Path, what: str) -> str:
    """The text of a file the user names (`what` names it in the message); one that cannot be read, or is not
    UTF-8 text, is the user's error, in one line."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read {what} {path}: not UTF-8 text (byte {exc.start})") from None


def read_json(path: str | Path, what: str, kind: type | None = None):
    """The parsed contents of a JSON file, which must be a `kind` (dict, list) where one is given; an unreadable or
    malformed file, or one of another kind, is the user's error, in one line."""
    try:
        data = json.loads(read_text(path, what))
    except json.JSONDecodeError as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from None
    if kind is not None and not isinstance(data, kind):
        raise UserError(f"cannot read {what} {path}: expected a JSON {_JSON_KINDS[kind]}, got {json.dumps(data)[:40]}")
    return data


_JSON_KINDS = {dict: "object", list: "array"}
