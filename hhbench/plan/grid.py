"""The sweep's plan: a grid of points from CLI flags or a suite file (suites/*.toml).

A suite holds `name`, `device` (any or cuda), one or more [[grid]] tables and a [timing] table; the points are the
grids' union, in order, duplicates dropped. Every grid key takes a list (or a single value): models, set (shape
overrides), layouts, ratios, contexts, batch, passes, scopes, fa_backend, gdn_backend, dtype, modes, head_map,
kv_aware, parts, floor (default true: layer and model points also time their floor, hhbench.bench.floor),
profile (default false: each point's step also profiled kernel by kernel, the profile unit of
hhbench.runner.measurements), gdn_chunk. [timing] sets the policy (TimingPolicy's fields). A table or key not
among these is an error that lists the known ones: a misspelt one would otherwise be ignored.
"""

import dataclasses
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from hhbench.errors import UserError
from hhbench.kernels import registry
from hhbench.measure.timing import TimingPolicy
from hhbench.resources import suites_dir
from hhbench.rows.schema import row_key
from hhbench.spec import parse as options
from hhbench.spec.axes import SEQUENTIAL, Pass, Scope, check_mode, dtype_bytes
from hhbench.spec.hybrid import GDNConfig, HybridSpec, Layout
from hhbench.spec.shapes import ModelShape

GRID_KEYS = {"models", "set", "layouts", "ratios", "contexts", "batch", "passes", "scopes", "fa_backend",
             "gdn_backend", "dtype", "modes", "head_map", "kv_aware", "parts", "floor", "profile", "gdn_chunk"}  # fmt: skip
SUITE_KEYS = ("name", "device", "grid", "timing")


@dataclass(frozen=True)
class Point:
    """One measurement to make: shape, spec (with the ratio text asked), context (tokens), batch, pass, scope,
    dtype, resolved backend names, head-level mode, and whether to also time the parts and the floor and profile
    the step kernel by kernel."""

    shape: ModelShape
    spec: HybridSpec
    ratio: str  # as requested
    context: int
    batch: int
    pass_: Pass
    scope: Scope
    dtype: str
    fa_backend: str  # resolved names, never "auto"
    gdn_backend: str
    mode: str
    parts: bool = False  # also time the FA and GDN parts alone (kernel scope, head layout)
    floor: bool = False  # also time the point's necessary kernels alone (layer and model scope)
    profile: bool = False  # also profile the step kernel by kernel (extra.kernels), apart from its timing

    def key_fields(self) -> dict:
        """The key fields (rows.schema.KEY_FIELDS) of the row this point produces, by name: what is measured,
        whatever ratio text asked for it (the variant holds the normalized ratio)."""
        spec = self.spec.normalized()
        return {"model": self.shape.name, "variant": spec.label, "context": self.context, "batch": self.batch,
                "pass_": self.pass_.value, "scope": self.scope.value, "dtype": self.dtype,
                "fa_backend": self.fa_backend, "gdn_backend": self.gdn_backend, "mode": self.mode,
                "head_map": spec.head_map.source if spec.head_map else "", "kv_aware": spec.kv_aware}  # fmt: skip

    @property
    def identity(self) -> tuple:
        """row_key of key_fields(): the key of the row this point produces, so plan and resume drop repeats by one
        rule."""
        return row_key(self.key_fields())


@dataclass
class Suite:
    """A named list of points with the timing policy they are measured under and the device they were planned for."""

    name: str
    points: list[Point]
    policy: TimingPolicy = field(default_factory=TimingPolicy)
    device: str = "cpu"


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def check_keys(found: dict, known, where: str = "") -> None:
    """Keys of `found` not in `known` are an error naming them (tables as [name]) and listing the known ones."""
    unknown = sorted(set(found) - set(known))
    if unknown:
        names = ", ".join(_toml_name(key, found[key]) for key in unknown)
        prefix = f"{where}: " if where else ""
        raise UserError(f"{prefix}unknown {names}: known are {', '.join(sorted(known))}")


def _toml_name(key: str, value) -> str:
    if isinstance(value, dict):
        return f"table [{key}]"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return f"table [[{key}]]"
    return f"key {key!r}"


def _flag(grid: dict, key: str, default: bool = False) -> bool:
    value = grid.get(key, default)
    if not isinstance(value, bool):
        raise UserError(f"grid key {key} takes true or false, got {value!r}")
    return value


def _values(grid: dict, key: str, default, kinds: tuple = (str,), what: str = "a string or a list of strings") -> list:
    """The key's value as a list, each item one of `kinds` (never a bool), else an error naming the key."""
    values = _as_list(grid.get(key, default))
    if not all(isinstance(v, kinds) and not isinstance(v, bool) for v in values):
        raise UserError(f"grid key {key} takes {what}, got {grid[key]!r}")
    return values


def _integers(grid: dict, key: str, default: int) -> list[int]:
    return _values(grid, key, default, (int,), "whole numbers")


def _text(
    grid: dict, key: str, default: str, kinds: tuple = (str,), what: str = "a string or a list of strings"
) -> str:
    """A comma-separated option's text, as the CLI flag takes it."""
    return ",".join(str(v) for v in _values(grid, key, default, kinds, what))


def grid_points(grid: dict, device: str) -> list[Point]:
    """The points of one [[grid]] table (or of the CLI flags as one), the product of its keys (GRID_KEYS), with
    backends resolved for `device` ("cpu", "cuda"). Raises UserError (one line) for an unknown key, a bad value,
    a backend that cannot run on the device or a sliding-window model."""
    check_keys(grid, GRID_KEYS)
    shapes = options.models(_text(grid, "models", "h32d128"), _values(grid, "set", []))
    for shape in shapes:
        if shape.windowed:  # the measured layers' FA backends attend to every earlier key
            raise UserError(
                f"model {shape.name} has sliding-window attention ({shape.windowed}): sweep measures full attention "
                "only; measure it without the window with --set sliding_window=0 (hhbench flops models the window)"
            )
    chunk = grid.get("gdn_chunk", 64)
    if not isinstance(chunk, int) or isinstance(chunk, bool):
        raise UserError(f"grid key gdn_chunk takes one whole number, got {chunk!r}")
    gdn = GDNConfig(chunk_size=chunk)
    head_maps = _values(grid, "head_map", "")
    specs = []
    for head_map in head_maps:
        specs += options.hybrid_specs(
            _text(grid, "layouts", "head,layer"), _text(grid, "ratios", "3:1,7:1"), gdn, head_map or None,
            _flag(grid, "kv_aware"),
        )  # fmt: skip
    contexts = options.contexts(_text(grid, "contexts", "4k", (str, int), "strings or whole numbers"))
    batches = [options.positive(b, "batch") for b in _integers(grid, "batch", 1)]
    passes = options.passes(_text(grid, "passes", "prefill"))
    scopes = [Scope.parse(s) for s in _values(grid, "scopes", "kernel")]
    dtypes = _values(grid, "dtype", "bf16")
    for dtype in dtypes:
        dtype_bytes(dtype)
    modes = _values(grid, "modes", SEQUENTIAL)
    for mode in modes:
        check_mode(mode, device)
    fa_names = _values(grid, "fa_backend", "auto")
    gdn_names = _values(grid, "gdn_backend", "auto")
    for name in fa_names:
        registry.check_name(name, registry.FA, device)
    for name in gdn_names:
        registry.check_name(name, registry.GDN, device)
    parts = _flag(grid, "parts")
    floor = _flag(grid, "floor", default=True)
    profile = _flag(grid, "profile")
    points = []
    for shape, (ratio, spec), context, batch, pass_, scope, dtype, mode, fa, gdn_name in itertools.product(
        shapes, specs, contexts, batches, passes, scopes, dtypes, modes, fa_names, gdn_names
    ):
        spec = spec.normalized()
        if mode != SEQUENTIAL and spec.layout is not Layout.HEAD:
            continue  # two streams only matter where one layer holds both kinds of heads
        points.append(
            Point(
                shape,
                spec,
                ratio,
                context,
                batch,
                pass_,
                scope,
                dtype,
                registry.resolve(fa, registry.FA, device, pass_.value, dtype, shape.head_dim).name,
                registry.resolve(gdn_name, registry.GDN, device, pass_.value, dtype, shape.head_dim).name,
                mode,
                parts and spec.layout is Layout.HEAD and scope is Scope.KERNEL,
                floor and scope is not Scope.KERNEL,
                profile,
            )  # fmt: skip
        )
    return points


def dedupe(points: list[Point]) -> list[Point]:
    """One point per configuration (`Point.identity`: 6:2 after 3:1 is dropped), in first-seen order; a point
    asked for with its parts or its floor timed, or its profile, keeps them."""
    unique: dict[tuple, Point] = {}
    for point in points:
        kept = unique.get(point.identity)
        unique[point.identity] = (
            point
            if kept is None
            else dataclasses.replace(
                kept,
                parts=kept.parts or point.parts,
                floor=kept.floor or point.floor,
                profile=kept.profile or point.profile,
            )
        )
    return list(unique.values())


def load_suite(name_or_path: str, device: str) -> Suite:
    """The Suite of suites/<name>.toml or of a .toml path, its points planned for `device` ("cpu", "cuda").
    Raises UserError (one line) for a missing or unreadable file, an unknown key or table, a bad grid or timing
    value, or a GPU suite without a GPU."""
    path = Path(name_or_path)
    if not path.exists():
        path = suites_dir() / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in suites_dir().glob("*.toml")))
        raise UserError(f"no suite {name_or_path!r}: give a .toml path or one of {known}")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cannot read suite {path}: {exc}") from None
    check_keys(data, SUITE_KEYS, f"suite {path}")
    needs = data.get("device", "any")
    if needs not in ("any", "cuda"):
        raise UserError(f"suite {path}: device {needs!r}: choose any or cuda")
    if needs == "cuda" and device != "cuda":
        raise UserError(f"suite {path.stem} needs a GPU and this machine has none: use the cpu suite")
    grids = data.get("grid", [])
    if isinstance(grids, dict):
        grids = [grids]
    if not isinstance(grids, list):
        raise UserError(f"suite {path}: grid must be [[grid]] tables, got {grids!r}")
    if not grids:
        raise UserError(f"suite {path} has no [[grid]] table")
    points = []
    for number, grid in enumerate(grids, 1):
        if not isinstance(grid, dict):
            raise UserError(f"suite {path}: grid must be [[grid]] tables, got {grid!r}")
        try:
            points += grid_points(grid, device)
        except UserError as exc:
            raise UserError(f"suite {path}: [[grid]] {number}: {exc}") from None
    points = dedupe(points)
    timing = data.get("timing", {})
    if not isinstance(timing, dict):
        raise UserError(f"suite {path}: timing must be a [timing] table, got {timing!r}")
    check_keys(timing, [f.name for f in dataclasses.fields(TimingPolicy)], f"suite {path}: [timing]")
    try:
        policy = TimingPolicy(**timing)
    except UserError as exc:
        raise UserError(f"suite {path}: [timing] {str(exc).removeprefix('timing option ')}") from None
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise UserError(f"suite {path}: name must be a non-empty string, got {name!r}")
    return Suite(name, points, policy, device)
