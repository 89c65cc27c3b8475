"""The vocabulary of a point's axes: pass, scope, dtype and head-level mode, as the cost model, the plan, the
kernels, the tables and the report name them. Torch-free (the cost model and the views run without torch); the
one map from a dtype's name to torch's dtype imports torch when it is called."""

from hhbench.errors import UserError
from hhbench.spec.units import Choice


class Pass(Choice):
    """What one timed step computes."""

    PREFILL = "prefill"  # forward over T tokens
    TRAIN = "train"  # forward + backward over T tokens
    DECODE = "decode"  # one new token at context T


class Scope(Choice):
    """What a point covers: `model` the whole network (attention layers, MLPs, LM head); `layer` one attention
    layer with its projections, averaged over the plan's layers; `kernel` the attention cores alone, averaged
    likewise."""

    KERNEL = "kernel"
    LAYER = "layer"
    MODEL = "model"


# Head-level execution of a layer's two kinds of heads: one backend after the other, or both at once on two CUDA
# streams (hhbench.kernels.hybrid.run_both). Plain strings, as rows store them.
SEQUENTIAL, STREAMS = "sequential", "streams"
MODES = (SEQUENTIAL, STREAMS)

# Bytes per element of each dtype name points and rows use (the cost model's memory terms).
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPES = tuple(DTYPE_BYTES)
_TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of the dtype named `dtype` ("bf16", "fp16", "fp32"): 2, 2 or 4.
    Raises UserError (one line, listing the names) for another name."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}") from None


def torch_dtype(dtype: str):
    """torch's dtype for the name `dtype` ("bf16" -> torch.bfloat16); imports torch. Raises UserError for an
    unknown name, as dtype_bytes does."""
    import torch

    dtype_bytes(dtype)
    return getattr(torch, _TORCH_NAMES[dtype])


def dtype_name(dtype) -> str | None:
    """The name ("bf16", "fp16", "fp32") of torch dtype `dtype`, or None for a dtype without one (fp64)."""
    torch_name = str(dtype).removeprefix("torch.")
    return next((name for name, known in _TORCH_NAMES.items() if known == torch_name), None)


def check_mode(mode: str, device: str) -> str:
    """`mode` if it names a head-level mode that runs on `device` ("cpu", "cuda"), else UserError (one line):
    streams needs CUDA, and is refused rather than run sequentially under the streams label."""
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    if mode == STREAMS and device != "cuda":
        raise UserError(f"mode streams runs the two backends on two CUDA streams, and this run is on {device}")
    return mode
