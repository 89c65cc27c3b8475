"""Attention backends, declared once by decorator and probed for availability (the tritonbench way).

A backend never crashes a sweep: `unavailable(device)` says why it cannot run on this machine at all, and
`unsupported(point)` why it refuses a particular point; both end up as the status and reason of a row.

FA backends take q [B, T, Hq, d] and k, v [B, T, Hkv, d] with Hq a multiple of Hkv (GQA), causal; decode takes
q [B, 1, Hq, d] against whole caches [B, S, Hkv, d]. GDN backends take fla's layout (reference.py says it).
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hhbench.errors import UserError

FA, GDN = "fa", "gdn"


@dataclass
class Backend:
    name: str
    kind: str  # FA or GDN
    devices: tuple[str, ...]  # "cpu", "cuda"
    description: str
    requires: str = ""  # an import that must succeed, e.g. "flash_attn"
    passes: tuple[str, ...] = ("prefill", "train", "decode")
    probe_fn: Callable[[], None] | None = None  # raises if the backend cannot run here

    def unavailable(self, device: str) -> str | None:
        """Why this backend cannot run on `device` here, or None."""
        if device not in self.devices:
            return f"{self.name} runs on {', '.join(self.devices)}, not {device}"
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        return _probe(self.name)

    def unsupported(self, pass_: str) -> str | None:
        if pass_ not in self.passes:
            return f"{self.name} does not implement the {pass_} pass"
        return None


REGISTRY: dict[str, Backend] = {}


def register(kind: str, name: str, devices: tuple[str, ...], description: str, **options):
    """Class decorator: the class body holds the kernel functions (static methods) for this backend."""

    def wrap(cls):
        backend = cls(name=name, kind=kind, devices=devices, description=description, **options)
        REGISTRY[name] = backend
        return cls

    return wrap


@functools.cache
def _probe(name: str) -> str | None:
    backend = REGISTRY[name]
    try:
        if backend.requires:
            __import__(backend.requires)
        if backend.probe_fn is not None:
            backend.probe_fn()
    except Exception as exc:  # any failure to import or run a tiny call means unavailable, with its reason
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return None


def get(name: str, kind: str) -> Backend:
    _load()
    backend = REGISTRY.get(name)
    if backend is None or backend.kind != kind:
        names = ", ".join(n for n, b in REGISTRY.items() if b.kind == kind)
        raise UserError(f"unknown {kind.upper()} backend {name!r}: choose from {names}, or auto")
    return backend


def names(kind: str) -> list[str]:
    _load()
    return [n for n, b in REGISTRY.items() if b.kind == kind]


# What `auto` means, per device and pass: the fastest backend that is correct there.
AUTO = {
    (FA, "cuda", "prefill"): "sdpa-cudnn",
    (FA, "cuda", "train"): "sdpa-cudnn",
    (FA, "cuda", "decode"): "triton-split",
    (FA, "cpu", "prefill"): "sdpa-math",
    (FA, "cpu", "train"): "sdpa-math",
    (FA, "cpu", "decode"): "sdpa-math",
    (GDN, "cuda", "prefill"): "fla-chunk",
    (GDN, "cuda", "train"): "fla-chunk",
    (GDN, "cuda", "decode"): "fla-recurrent",
    (GDN, "cpu", "prefill"): "torch-chunk",
    (GDN, "cpu", "train"): "torch-chunk",
    (GDN, "cpu", "decode"): "torch-recurrent",
}


def resolve(name: str, kind: str, device: str, pass_: str) -> Backend:
    return get(AUTO[(kind, device, pass_)] if name == "auto" else name, kind)


def _load() -> None:
    from hhbench.kernels import fa, gdn, split_kv  # noqa: F401  (the modules register their backends)
