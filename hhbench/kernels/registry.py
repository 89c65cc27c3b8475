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
from hhbench.names import Registry

FA, GDN = "fa", "gdn"
# The method a backend of each kind runs for each pass: a backend declares its passes, and defines these.
METHODS = {(FA, "prefill"): "prefill", (FA, "train"): "prefill", (FA, "decode"): "decode",
           (GDN, "prefill"): "prefill", (GDN, "train"): "prefill", (GDN, "decode"): "step"}  # fmt: skip


@dataclass
class Backend:
    """One attention backend: its name, kind (FA or GDN), devices, what it needs and refuses, and the kernel
    methods its passes run (METHODS): an FA backend's `prefill` (training differentiates it) and `decode`, a GDN
    backend's `prefill` and `step`. A method a backend does not define raises NotImplementedError, which a row
    records as unsupported; `register` refuses a backend that declares a pass without its method."""

    name: str
    kind: str  # FA or GDN
    devices: tuple[str, ...]  # "cpu", "cuda"
    description: str
    requires: str = ""  # an import that must succeed, e.g. "flash_attn"
    passes: tuple[str, ...] = ("prefill", "train", "decode")
    probe_fn: Callable[[], None] | None = None  # raises if the backend cannot run here
    dtypes: tuple[str, ...] | None = None  # the only dtypes it takes (None: any)
    head_dims: tuple[int, ...] | None = None  # the only head dims it takes (None: any)

    def unavailable(self, device: str) -> str | None:
        """Why this backend cannot run on `device` here, or None."""
        if device not in self.devices:
            return f"{self.name} runs on {', '.join(self.devices)}, not {device}"
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        return _probe(self.name)

    def unsupported(self, pass_: str, dtype: str | None = None, head_dim: int | None = None) -> str | None:
        """Why this backend refuses a point of this pass, dtype and head dim, or None."""
        if pass_ not in self.passes:
            return f"{self.name} does not implement the {pass_} pass"
        if dtype is not None and self.dtypes and dtype not in self.dtypes:
            return f"{self.name} takes {', '.join(self.dtypes)}, not {dtype}"
        if head_dim is not None and self.head_dims and head_dim not in self.head_dims:
            return f"{self.name} takes head dims {', '.join(map(str, self.head_dims))}, not {head_dim}"
        return None

    def implementation(self, pass_: str) -> str:
        """What runs for this pass, as precisely as the backend can say (rows record it)."""
        return self.description

    def prefill(self, *inputs, **options):
        """Causal attention over T tokens, forward (and backward under autograd). FA: q [B, T, Hq, d], k, v
        [B, T, Hkv, d] with Hq a multiple of Hkv -> o [B, T, Hq, d]. GDN: q, k [B, T, H, dk], v [B, T, H, dv],
        g (log decay) and beta [B, T, H]; options output_final_state, chunk_size (tokens),
        use_qk_l2norm_in_kernel -> (o [B, T, H, dv], final state [B, H, dk, dv] fp32 or None)."""
        raise NotImplementedError(f"{self.name} does not implement prefill")

    def decode(self, q, k_cache, v_cache):
        """FA, one new token: q [B, 1, Hq, d] against whole caches [B, S, Hkv, d] -> o [B, 1, Hq, d]."""
        raise NotImplementedError(f"{self.name} does not implement decode")

    def step(
        self, q, k, v, g, beta, state, use_qk_l2norm_in_kernel: bool = False, use_gate_in_kernel: bool = False,
        A_log=None, dt_bias=None, use_beta_sigmoid_in_kernel: bool = False,
    ):  # fmt: skip
        """GDN, one recurrent step: q, k [B, H, dk], v [B, H, dv], g and beta [B, H], state [B, H, dk, dv] fp32
        -> (o [B, H, dv], new state). fla's fused_recurrent_gated_delta_rule options, named as there:
        use_qk_l2norm_in_kernel L2-normalizes q and k; use_gate_in_kernel takes g raw (the decay gate's input a)
        and applies g = -exp(A_log) * softplus(a + dt_bias) with A_log, dt_bias [H]; use_beta_sigmoid_in_kernel
        takes beta raw (b) and applies sigmoid. So a decode step needs no gate kernels of its own."""
        raise NotImplementedError(f"{self.name} does not implement step")


REGISTRY: Registry = Registry("backend")


def register(kind: str, name: str, devices: tuple[str, ...], description: str, **options):
    """Class decorator: the class (a Backend) defines the kernel methods of the passes it declares (METHODS).
    Raises ValueError for a name registered twice or a declared pass whose method the class lacks."""

    def wrap(cls):
        REGISTRY.check_new(name)
        backend = cls(name=name, kind=kind, devices=devices, description=description, **options)
        for pass_ in backend.passes:
            method = METHODS[(kind, pass_)]
            if getattr(cls, method) is getattr(Backend, method):
                raise ValueError(f"backend {name!r} declares the {pass_} pass and defines no {method}")
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
    """The registered backend `name` of `kind` (FA or GDN). Raises UserError (one line, listing the names) for an
    unknown name or one of the other kind."""
    _load()
    backend = REGISTRY.get(name)
    if backend is None or backend.kind != kind:
        names = ", ".join(n for n, b in REGISTRY.items() if b.kind == kind)
        raise UserError(f"unknown {kind.upper()} backend {name!r}: choose from {names}, or auto")
    return backend


def check_name(
    name: str, kind: str, device: str, pass_: str | None = None, dtype: str | None = None, head_dim: int | None = None
) -> None:
    """A backend name as a user gives it: "auto", or a known backend that runs on `device` ("cpu", "cuda"), and,
    given a pass, one that runs that pass here (in `dtype`, at `head_dim`, where given: resolve's names). Raises
    UserError (one line) for an unknown name, a GPU-only backend on a machine without a GPU, or a backend that cannot
    run the pass here (Backend.unavailable, Backend.unsupported): a command that is no sweep has no row to hold it."""
    if name == "auto":
        return
    backend = get(name, kind)
    if device not in backend.devices:
        raise UserError(f"backend {name} needs {' or '.join(backend.devices)}, and this run is on {device}")
    if pass_ is not None:
        reason = backend.unavailable(device) or backend.unsupported(pass_, dtype, head_dim)
        if reason is not None:
            raise UserError(f"backend {name} cannot run the {pass_} pass here: {reason}")


def names(kind: str) -> list[str]:
    """Names of the registered backends of `kind` (FA or GDN), in registration order."""
    _load()
    return [n for n, b in REGISTRY.items() if b.kind == kind]


# What `auto` means, per device and pass: candidates in order of preference, fastest first. auto takes the first
# that is available here and accepts the point's pass, dtype and head dim; where the caller does not say one of
# them (a layer built with `auto` outside a sweep knows its dtype at the call, not a point's head dim) a candidate
# restricted on that axis is passed over. cuDNN attention takes bf16 and fp16 only: fp32 gets SDPA's
# memory-efficient kernel. FlashQLA leads GDN prefill and training on the GPU: 3.1-3.8x fla's Triton chunk forward
# at 64K-128K on an H200, 2.3x at 16K (issue 12); like every backend it is checked against the fp32 reference on
# each point before it is timed.
AUTO = {
    (FA, "cuda", "prefill"): ("sdpa-cudnn", "sdpa-efficient"),
    (FA, "cuda", "train"): ("sdpa-cudnn", "sdpa-efficient"),
    (FA, "cuda", "decode"): ("triton-split",),
    (FA, "cpu", "prefill"): ("sdpa-math",),
    (FA, "cpu", "train"): ("sdpa-math",),
    (FA, "cpu", "decode"): ("sdpa-math",),
    (GDN, "cuda", "prefill"): ("flash-qla", "fla-chunk"),
    (GDN, "cuda", "train"): ("flash-qla", "fla-chunk"),
    (GDN, "cuda", "decode"): ("fla-recurrent",),
    (GDN, "cpu", "prefill"): ("torch-chunk",),
    (GDN, "cpu", "train"): ("torch-chunk",),
    (GDN, "cpu", "decode"): ("torch-recurrent",),
}


def resolve(
    name: str, kind: str, device: str, pass_: str, dtype: str | None = None, head_dim: int | None = None
) -> Backend:
    """The backend `name` names; for `auto` the first candidate of AUTO that fits (see there), else the last one
    (whose row then says why it cannot run). dtype: "bf16", "fp16", "fp32" or None (not known); head_dim likewise."""
    if name != "auto":
        return get(name, kind)
    candidates = [get(n, kind) for n in AUTO[(kind, device, pass_)]]
    for backend in candidates:
        if (backend.dtypes and dtype is None) or (backend.head_dims and head_dim is None):
            continue  # restricted on an axis the caller does not say
        if backend.unavailable(device) is None and backend.unsupported(pass_, dtype, head_dim) is None:
            return backend
    return candidates[-1]


def layer_backend(choice: "str | Backend", kind: str, device: str, pass_: str, dtype: str | None = None) -> Backend:
    """A layer's backend of `kind` for a pass on `device` in `dtype` (resolve's names): `choice` itself where the
    caller resolved it (a Backend: the sweep's points name theirs), else resolve(choice, ...) of a name ("auto" or a
    registered one). Raises UserError for an unknown name."""
    return choice if isinstance(choice, Backend) else resolve(choice, kind, device, pass_, dtype)


def auto_choices(device: str) -> dict[str, list[str]]:
    """Per kind and pass, the candidates of `auto` that are available on this machine, in order (env.json)."""
    return {
        f"{kind}/{pass_}": [n for n in names_ if get(n, kind).unavailable(device) is None]
        for (kind, where, pass_), names_ in AUTO.items()
        if where == device
    }


def _load() -> None:
    from hhbench.kernels import fa, gdn, split_kv  # noqa: F401  (the modules register their backends)
