"""The selection itself (the layout builder's scored head rule: one rule in the code base) and the head-map
JSON that `hhbench select-heads` writes and `flops --head-map`, `sweep` and `eval` read.

The file keeps `fa_heads` and `scores` (what HeadMap.load reads) and adds the model, both score components,
the requested and effective ratio, the probe settings and a schema version; HeadMap.load ignores the rest.
"""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from hhbench.errors import UserError
from hhbench.files import open_output, read_json
from hhbench.spec.hybrid import HeadMap, HybridSpec, Layout, Ratio
from hhbench.spec.layout import LayerPlan, build_plan
from hhbench.spec.shapes import ModelShape

KIND = "hhbench-head-map"
SCHEMA = 1

Grid = tuple[tuple[float, ...], ...]


def select(shape: ModelShape, scores: Grid, ratio: Ratio, kv_aware: bool = False) -> LayerPlan:
    """The head-layout plan for per-head scores: the budget round(L*H*fa/(la+fa)), every layer's best head
    first, the rest by score over the whole model, optionally packed into few KV groups."""
    head_map = HeadMap(fa_heads=(), scores=scores, source="scores")
    return build_plan(shape, HybridSpec(Layout.HEAD, ratio, head_map=head_map, kv_aware=kv_aware))


@dataclass(frozen=True)
class HeadSelection:
    """The head map `hhbench select-heads` writes: the model, the FA heads per layer chosen by select, the scores
    they were chosen by, the ratio asked and achieved, and the probe settings."""

    model: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ratio: str  # requested LA:FA
    ratio_effective: str
    kv_aware: bool
    fa_heads: tuple[tuple[int, ...], ...]
    scores: Grid  # the combined score the selection used
    retrieval: Grid
    patching: Grid
    combine: str
    probes: int  # per length
    lengths: tuple[int, ...]
    seed: int
    device: str
    kv_groups: int = 0  # distinct KV heads the FA heads read, summed over layers
    probe_stats: dict = field(default_factory=dict)
    seconds: float | None = None
    kind: str = KIND
    schema: int = SCHEMA

    @property
    def n_fa(self) -> int:
        """FA heads over the model."""
        return sum(len(layer) for layer in self.fa_heads)

    def top(self, count: int) -> list[tuple[int, int]]:
        """The best (layer, head) pairs by combined score."""
        pairs = [(layer, head) for layer in range(self.n_layers) for head in range(self.n_heads)]
        return sorted(pairs, key=lambda p: (-self.scores[p[0]][p[1]], p))[:count]

    def to_dict(self) -> dict:
        """The selection as JSON-ready data (score grids as lists)."""
        return {k: ([list(row) for row in v] if k in _GRIDS else v) for k, v in asdict(self).items()}

    def save(self, path: str | Path) -> None:
        """JSON with one line a layer for the per-layer lists, so that the file reads as a table."""
        items = []
        for key, value in self.to_dict().items():
            if key in _GRIDS:
                rows = ",\n".join(f"    {json.dumps(row)}" for row in value)
                items.append(f'  "{key}": [\n{rows}\n  ]')
            else:
                items.append(f"  {json.dumps(key)}: {json.dumps(value)}")
        with open_output(path, "w") as out:
            out.write("{\n" + ",\n".join(items) + "\n}\n")

    @classmethod
    def load(cls, path: str | Path) -> "HeadSelection":
        """Read a head map written by select-heads. Raises UserError for another kind of file, another schema version
        or a malformed one."""
        data = read_json(path, "head selection")
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise UserError(f"{path} is not a head map written by hhbench select-heads")
        if data.get("schema") != SCHEMA:
            raise UserError(f"{path}: head map schema {data.get('schema')} is not the supported {SCHEMA}")
        known = {f.name for f in fields(cls)}
        try:
            data = {k: v for k, v in data.items() if k in known}
            for name in _GRIDS:
                data[name] = tuple(tuple(row) for row in data[name])
            data["lengths"] = tuple(data["lengths"])
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise UserError(f"{path}: malformed head map ({exc})") from None


_GRIDS = ("fa_heads", "scores", "retrieval", "patching")
