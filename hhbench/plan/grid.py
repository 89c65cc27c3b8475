"""The sweep's plan: a grid of points from CLI flags or a suite file (suites/*.toml).

A suite holds one or more [[grid]] tables; the points are their union, in order, duplicates dropped. Every
grid key takes a list (or a single value): models, set (shape overrides), layouts, ratios, contexts, batch,
passes, scopes, fa_backend, gdn_backend, dtype, modes, head_map, kv_aware, parts. [timing] sets the policy.
"""

import dataclasses
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from hhbench.analytic.costs import Scope, dtype_bytes
from hhbench.analytic.flops import Pass
from hhbench.errors import UserError
from hhbench.kernels import registry
from hhbench.kernels.hybrid import MODES, SEQUENTIAL, STREAMS
from hhbench.measure.timing import TimingPolicy
from hhbench.spec import parse as options
from hhbench.spec.hybrid import GDNConfig, HybridSpec, Layout
from hhbench.spec.shapes import ModelShape

SUITES = Path(__file__).resolve().parents[2] / "suites"
GRID_KEYS = {"models", "set", "layouts", "ratios", "contexts", "batch", "passes", "scopes", "fa_backend",
             "gdn_backend", "dtype", "modes", "head_map", "kv_aware", "parts", "gdn_chunk"}  # fmt: skip


@dataclass(frozen=True)
class Point:
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

    @property
    def key(self) -> tuple:
        """The same tuple as Row.key of the row this point produces."""
        return (self.shape.name, self.spec.normalized().label, self.ratio, self.context, self.batch, self.pass_.value,
                self.scope.value, self.dtype, self.fa_backend, self.gdn_backend, self.mode,
                self.spec.head_map.source if self.spec.head_map else "", self.spec.kv_aware)  # fmt: skip


@dataclass
class Suite:
    name: str
    points: list[Point]
    policy: TimingPolicy = field(default_factory=TimingPolicy)
    device: str = "cpu"


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _text(value) -> str:
    return ",".join(str(v) for v in _as_list(value))


def grid_points(grid: dict, device: str) -> list[Point]:
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise UserError(f"unknown grid keys {sorted(unknown)}: known are {', '.join(sorted(GRID_KEYS))}")
    shapes = options.models(_text(grid.get("models", "h32d128")), [str(s) for s in _as_list(grid.get("set", []))])
    gdn = GDNConfig(chunk_size=int(grid.get("gdn_chunk", 64)))
    head_maps = _as_list(grid.get("head_map", ""))
    specs = []
    for head_map in head_maps:
        specs += options.hybrid_specs(
            _text(grid.get("layouts", "head,layer")), _text(grid.get("ratios", "3:1,7:1")), gdn, head_map or None,
            bool(grid.get("kv_aware", False)),
        )  # fmt: skip
    contexts = options.contexts(_text(grid.get("contexts", "4k")))
    batches = [options.positive(int(b), "batch") for b in _as_list(grid.get("batch", 1))]
    passes = options.passes(_text(grid.get("passes", "prefill")))
    scopes = [Scope.parse(s) for s in _as_list(grid.get("scopes", "kernel"))]
    dtypes = _as_list(grid.get("dtype", "bf16"))
    for dtype in dtypes:
        dtype_bytes(dtype)
    modes = _as_list(grid.get("modes", SEQUENTIAL))
    for mode in modes:
        if mode not in MODES:
            raise UserError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
        if mode == STREAMS and device != "cuda":  # refused, not run sequentially under the streams label
            raise UserError(f"mode streams runs the two backends on two CUDA streams, and this run is on {device}")
    fa_names = _as_list(grid.get("fa_backend", "auto"))
    gdn_names = _as_list(grid.get("gdn_backend", "auto"))
    for name in fa_names:
        _check_backend(name, registry.FA, device)
    for name in gdn_names:
        _check_backend(name, registry.GDN, device)
    parts = bool(grid.get("parts", False))
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
                registry.resolve(fa, registry.FA, device, pass_.value).name,
                registry.resolve(gdn_name, registry.GDN, device, pass_.value).name,
                mode,
                parts and spec.layout is Layout.HEAD and scope is Scope.KERNEL,
            )  # fmt: skip
        )
    return points


def _check_backend(name: str, kind: str, device: str) -> None:
    """An unknown backend, or a GPU-only backend asked for on a machine without a GPU, is the user's error."""
    if name == "auto":
        return
    backend = registry.get(name, kind)
    if device not in backend.devices:
        raise UserError(f"backend {name} needs {' or '.join(backend.devices)}, and this run is on {device}")


def dedupe(points: list[Point]) -> list[Point]:
    """One point per key, in first-seen order; a point asked for with its parts timed keeps them."""
    unique: dict[tuple, Point] = {}
    for point in points:
        kept = unique.get(point.key)
        if kept is None or (point.parts and not kept.parts):
            unique[point.key] = point if kept is None else dataclasses.replace(kept, parts=True)
    return list(unique.values())


def load_suite(name_or_path: str, device: str) -> Suite:
    path = Path(name_or_path)
    if not path.exists():
        path = SUITES / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in SUITES.glob("*.toml")))
        raise UserError(f"no suite {name_or_path!r}: give a .toml path or one of {known}")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"cannot read suite {path}: {exc}") from None
    needs = data.get("device", "any")
    if needs == "cuda" and device != "cuda":
        raise UserError(f"suite {path.stem} needs a GPU and this machine has none: use the cpu suite")
    grids = data.get("grid", [])
    if isinstance(grids, dict):
        grids = [grids]
    if not grids:
        raise UserError(f"suite {path} has no [[grid]] table")
    points = dedupe([p for grid in grids for p in grid_points(grid, device)])
    try:
        policy = TimingPolicy(**data.get("timing", {}))
    except TypeError as exc:
        raise UserError(f"suite {path}: bad [timing] table: {exc}") from None
    return Suite(data.get("name", path.stem), points, policy, device)
