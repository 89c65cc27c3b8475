"""What a hybrid is: its layout, its LA:FA ratio, the Gated DeltaNet settings and an optional head map."""

import re
from dataclasses import dataclass, field, replace
from math import gcd
from pathlib import Path

from hhbench.errors import UserError
from hhbench.files import read_json
from hhbench.spec.units import Choice


class Layout(Choice):
    """Where a hybrid puts its two kinds of heads: inside every layer (head, HydraHead), in whole layers (layer),
    or nowhere (fa: all full attention; la: all Gated DeltaNet)."""

    HEAD = "head"  # FA and GDN heads side by side inside every layer (HydraHead)
    LAYER = "layer"  # whole FA layers among whole GDN layers (Qwen3-Next style)
    FA = "fa"  # every head full attention: the vanilla transformer
    LA = "la"  # every head Gated DeltaNet


_RATIO = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Ratio:
    """LA:FA, in heads (head layout) or layers (layer layout). 0:1 is all FA, 1:0 all linear."""

    la: int
    fa: int

    def __post_init__(self):
        if self.la < 0 or self.fa < 0 or self.la + self.fa == 0:
            raise UserError(f"bad ratio {self.la}:{self.fa}: both parts >= 0 and not both 0")

    @classmethod
    def parse(cls, text: str) -> "Ratio":
        """'7:1' -> Ratio(7, 1) (LA:FA, whole numbers). Raises UserError (one line) for other text."""
        match = _RATIO.match(text)
        if not match:
            raise UserError(f"bad ratio {text!r}: expected LA:FA with whole numbers, e.g. 7:1, 3:1, 0:1 (all FA)")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def fa_fraction(self) -> float:
        """The FA share fa / (la + fa): 0.125 for 7:1."""
        return self.fa / (self.la + self.fa)

    def reduced(self) -> "Ratio":
        """The same proportion in lowest terms: 6:2 is 3:1, 0:2 is 0:1."""
        divisor = gcd(self.la, self.fa)
        return Ratio(self.la // divisor, self.fa // divisor)

    def __str__(self) -> str:
        return f"{self.la}:{self.fa}"


def format_effective_ratio(la: float, fa: float) -> str:
    """The ratio a plan really has: '7:1', '236:34' reduced to '118:17', or 'inf' style ends."""
    if fa == 0:
        return "1:0"
    if la == 0:
        return "0:1"
    if float(la).is_integer() and float(fa).is_integer():
        divisor = gcd(int(la), int(fa))
        return f"{int(la) // divisor}:{int(fa) // divisor}"
    return f"{la / fa:.3g}:1"


@dataclass(frozen=True)
class GDNConfig:
    """Gated DeltaNet head settings. Key/value dims of None mean the model's head_dim: HydraHead reuses each
    converted head's Q/K/V projections, so its GDN heads keep the head's width. Raises UserError for a chunk size or
    a head dim <= 0, or a conv size < 0."""

    chunk_size: int = 64
    head_k_dim: int | None = None
    head_v_dim: int | None = None
    conv_size: int = 4  # short causal depthwise conv on q, k, v; 0 disables it
    output_gate: bool = True
    state_dtype_bytes: int = 4  # the recurrent state is kept in fp32 by fla's kernels

    def __post_init__(self):
        if self.chunk_size <= 0:
            raise UserError(f"GDN chunk size must be positive, got {self.chunk_size}")
        if self.conv_size < 0:
            raise UserError(f"GDN conv size must be >= 0, got {self.conv_size}")
        for name, dim in (("key", self.head_k_dim), ("value", self.head_v_dim)):
            if dim is not None and dim <= 0:  # a negative width gave negative FLOPs and state bytes
                raise UserError(f"GDN {name} head dim must be positive, got {dim}")

    def dims(self, head_dim: int) -> tuple[int, int]:
        """(dk, dv): the GDN heads' key and value widths, the model's `head_dim` where not set."""
        return (self.head_k_dim or head_dim, self.head_v_dim or head_dim)


def _head_index(value) -> int:
    """A head index as JSON gives it: a whole number >= 0 (not 0.5, true or "3", which int() would take)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a head index: {value!r}")
    return value


@dataclass(frozen=True)
class HeadMap:
    """Per layer, which heads keep full attention; optional per-head scores it was chosen from."""

    fa_heads: tuple[tuple[int, ...], ...]
    scores: tuple[tuple[float, ...], ...] | None = None
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "HeadMap":
        """Reads the head-selection JSON: {"fa_heads": [[...], ...]} and optionally {"scores": [[...], ...]}."""
        data = read_json(path, "head map")
        if not isinstance(data, dict) or ("fa_heads" not in data and "scores" not in data):
            raise UserError(f"head map {path} has neither 'fa_heads' nor 'scores'")
        try:
            fa = tuple(tuple(sorted(_head_index(h) for h in layer)) for layer in data.get("fa_heads") or ())
            scores = data.get("scores")
            scores = tuple(tuple(float(s) for s in layer) for layer in scores) if scores else None
        except (TypeError, ValueError):
            raise UserError(
                f"head map {path}: fa_heads must be lists of head indices, scores lists of numbers"
            ) from None
        return cls(fa_heads=fa, scores=scores, source=str(path))


@dataclass(frozen=True)
class HybridSpec:
    """One hybrid configuration: layout, LA:FA ratio, GDN settings, an optional head map (which heads keep FA, or
    scores to pick them by) and kv_aware (FA heads packed into as few KV groups as possible)."""

    layout: Layout
    ratio: Ratio
    gdn: GDNConfig = field(default_factory=GDNConfig)
    head_map: HeadMap | None = None
    kv_aware: bool = False  # pack FA heads into as few KV groups as possible

    def normalized(self) -> "HybridSpec":
        """One spec per configuration, so that grids dedupe: 0:1 in any layout is the vanilla transformer and 1:0
        pure GDN, and a ratio is a proportion, in lowest terms (6:2 is 3:1, also for the layer layout's groups)."""
        if self.layout in (Layout.HEAD, Layout.LAYER) and self.head_map is None:
            if self.ratio.la == 0:
                return HybridSpec(Layout.FA, Ratio(0, 1), self.gdn)
            if self.ratio.fa == 0:
                return HybridSpec(Layout.LA, Ratio(1, 0), self.gdn)
        if self.layout is Layout.FA:
            return HybridSpec(Layout.FA, Ratio(0, 1), self.gdn)
        if self.layout is Layout.LA:
            return HybridSpec(Layout.LA, Ratio(1, 0), self.gdn)
        return replace(self, ratio=self.ratio.reduced())

    @property
    def label(self) -> str:
        """'head:7:1', 'layer:3:1', 'fa', 'la' (plus '+map' / '+kv' for the variants)."""
        if self.layout in (Layout.FA, Layout.LA):
            return self.layout.value
        suffix = ("+map" if self.head_map else "") + ("+kv" if self.kv_aware else "")
        return f"{self.layout.value}:{self.ratio}{suffix}"


LAYER31 = HybridSpec(Layout.LAYER, Ratio(3, 1))  # the baseline every comparison is made against
