"""Reading and writing files the user names: a path that cannot be read or written is the user's error,
said in one line."""

import json
from pathlib import Path

from hhbench.errors import UserError


def open_output(path: str | Path, mode: str):
    """Open a file for writing, making its folder; an unwritable path is the user's error, in one line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, mode)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_json(path: str | Path, what: str):
    """The parsed contents of a JSON file; an unreadable or malformed file is the user's error, in one line."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from None
