"""Parsing of the small textual values users type: token counts, lists, byte sizes."""

import re
from enum import Enum

from hhbench.errors import UserError

_SUFFIX = {"": 1, "k": 1024, "m": 1024**2}
_COUNT = re.compile(r"^(\d+)([km]?)$")


def parse_count(text: str, what: str = "context") -> int:
    """'4k' -> 4096, '1m' -> 1048576, '4096' -> 4096 (binary suffixes, as context lengths are quoted)."""
    match = _COUNT.match(text.strip().lower())
    if not match:
        raise UserError(
            f"bad {what} {text!r}: expected a positive integer with an optional k or m suffix (4k, 4096, 1m)"
        )
    value = int(match.group(1)) * _SUFFIX[match.group(2)]
    if value <= 0:
        raise UserError(f"bad {what} {text!r}: must be positive")
    return value


def format_count(value: int) -> str:
    """4096 -> '4k', 1048576 -> '1m', 1000 -> '1000'."""
    for suffix, size in (("m", 1024**2), ("k", 1024)):
        if value >= size and value % size == 0:
            return f"{value // size}{suffix}"
    return str(value)


def split_list(text: str | list[str] | None) -> list[str]:
    """'a,b' or ['a,b', 'c'] -> ['a', 'b', 'c'] (options may be repeated or comma-separated)."""
    if text is None:
        return []
    parts = [text] if isinstance(text, str) else list(text)
    return [item.strip() for part in parts for item in part.split(",") if item.strip()]


def format_bytes(value: float) -> str:
    """Bytes in binary units: 512 -> '512 B', 3 * 2**20 -> '3.00 MiB' (up to TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class Choice(str, Enum):
    """A closed set of names typed on the command line; `parse` turns a bad one into one clear line."""

    @classmethod
    def parse(cls, text: str):
        """The member named `text` (case and surrounding spaces ignored). Raises UserError (one line, listing the
        names) for another."""
        try:
            return cls(text.strip().lower())
        except ValueError:
            choices = ", ".join(member.value for member in cls)
            raise UserError(f"unknown {cls.__name__.lower()} {text!r}: choose from {choices}") from None
