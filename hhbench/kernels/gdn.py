"""Gated DeltaNet backends: fla's Triton kernels, FlashQLA's TileLang kernels and the pure-torch reference forms.

`prefill(q, k, v, g, beta, initial_state, output_final_state, chunk_size)` runs a whole sequence; `step(q, k, v, g, beta,
state)` one decode token with [B, H, *] inputs. q and k arrive L2-normalized, unless `use_qk_l2norm_in_kernel` (fla's
flag; the layer's fused path sets it) asks the backend to normalize them; g as log decay, beta in (0, 1), unless a
step's `use_gate_in_kernel` and `use_beta_sigmoid_in_kernel` (fla's flags; the fused decode sets them) give them raw
(Backend.step).
"""

import contextlib
import importlib.metadata
import os

import torch
import torch.nn.functional as F

from hhbench.errors import Unsupported
from hhbench.kernels import reference
from hhbench.kernels.hybrid import grad_flows
from hhbench.kernels.registry import GDN, Backend, register

# fla >= 0.6 sends chunk_gated_delta_rule to FlashQLA whenever flash_qla imports, unless this variable is "0". fla's
# dispatch reads it on every call (fla.backends.BaseBackend.is_enabled), so setting it around a call pins that call.
FLASH_QLA_SWITCH = "FLA_FLASH_QLA"
# The chunk sizes fla 0.6's chunk_gated_delta_rule takes, through its **kwargs (fla/ops/gated_delta_rule/chunk.py)
FLA_CHUNK_SIZES = (16, 32, 64)
# Where fla sends chunk_bwd_dqkwg to TileLang (fla_tilelang_backward), TileLang fails to build it for 16-token chunks:
# "No valid warp partition for T.gemm: M=16, N=16 cannot be evenly covered by 4 warps" (fla 0.6.0, TileLang 0.1.15,
# H200); fla's verifier (fla/ops/common/backends/tilelang) does not look at the chunk size.
TILELANG_BACKWARD_REFUSAL = (
    "fla sends the GDN backward's chunk_bwd_dqkwg to TileLang here (Hopper, Triton >= 3.4; fla refuses its Triton "
    "kernel below Triton 3.7.1 for wrong gradients, fla issue #640), and TileLang does not build it for 16-token "
    "chunks (no warp partition of a 16x16 gemm over 4 warps): train at chunks of 32 or 64"
)


@contextlib.contextmanager
def fla_triton_only():
    """Within: fla's chunk_gated_delta_rule runs fla's own Triton path, never FlashQLA. The variable is put back
    as it was on leaving (absent stays absent)."""
    before = os.environ.get(FLASH_QLA_SWITCH)
    os.environ[FLASH_QLA_SWITCH] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[FLASH_QLA_SWITCH]
        else:
            os.environ[FLASH_QLA_SWITCH] = before


def _probe_fla():
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401  (needs triton and a GPU build)


def fla_tilelang_backward() -> bool:
    """Whether fla sends the gated chunk backward's dq/dk/dw/dg kernel (chunk_bwd_dqkwg) to TileLang: its own
    dispatch condition. On Hopper with Triton 3.4-3.7.0 that is what lets GDN training run at all (fla refuses the
    Triton kernel there: it computes wrong gradients, fla issue #640)."""
    try:
        from fla.ops.common.backends import CommonTileLangBackend
    except ImportError:
        return False
    return CommonTileLangBackend.is_available() and CommonTileLangBackend().is_enabled()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


@register(
    GDN,
    "fla-chunk",
    ("cuda",),
    "fla chunk_gated_delta_rule (Triton, chunked WY form)",
    probe_fn=_probe_fla,
    passes=("prefill", "train"),
)
class FlaChunk(Backend):
    """fla's chunk_gated_delta_rule (Gated DeltaNet, Yang et al. 2024), pinned to fla's own Triton path
    (fla_triton_only); prefill and training."""

    def prefill(
        self, q, k, v, g, beta, initial_state=None, output_final_state=False, chunk_size=64,
        use_qk_l2norm_in_kernel=False,
    ):  # fmt: skip
        """fla chunk_gated_delta_rule over [B, T, H, *] inputs (Backend.prefill gives the shapes) -> (o, final state
        or None). Raises Unsupported, before any kernel runs, for a chunk size fla's kernels do not take
        (FLA_CHUNK_SIZES), and for chunks of 16 where gradients will flow and fla would send the backward to TileLang
        (TILELANG_BACKWARD_REFUSAL)."""
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        if chunk_size not in FLA_CHUNK_SIZES:
            raise Unsupported(f"fla's chunk kernels take chunks of {', '.join(map(str, FLA_CHUNK_SIZES))} tokens")
        if chunk_size == 16 and grad_flows(q, k, v, g, beta, initial_state) and fla_tilelang_backward():
            raise Unsupported(TILELANG_BACKWARD_REFUSAL)
        with fla_triton_only():
            return chunk_gated_delta_rule(
                q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, chunk_size=chunk_size,
            )  # fmt: skip

    def implementation(self, pass_: str) -> str:
        """fla's version and path; for training, whether fla sends chunk_bwd_dqkwg to TileLang."""
        what = f"fla {_version('fla-core')} Triton chunk ({FLASH_QLA_SWITCH}=0)"
        if pass_ == "train" and fla_tilelang_backward():
            what += ", backward chunk_bwd_dqkwg in TileLang"
        return what


def _probe_flash_qla():
    import flash_qla  # noqa: F401  (needs tilelang and an SM90/SM100/SM120 GPU: it raises at import elsewhere)


def fla_l2norm(x: torch.Tensor) -> torch.Tensor:
    """x [..., d] L2-normalized over d (eps 1e-6 inside the root, in fp32, in x's dtype) by fla's Triton kernel, with
    its backward: the kernel fla's chunk path runs for use_qk_l2norm_in_kernel (fla/ops/gated_delta_rule/chunk.py)."""
    from fla.modules.norm.l2norm import l2norm

    return l2norm(x)


@register(
    GDN,
    "flash-qla",
    ("cuda",),
    "FlashQLA chunk_gated_delta_rule (TileLang, fused forward and backward)",
    probe_fn=_probe_flash_qla,
    passes=("prefill", "train"),
    dtypes=("bf16", "fp16"),
    head_dims=(128,),
)
class FlashQla(Backend):
    """The Qwen team's kernels (github.com/QwenLM/FlashQLA), called directly: fla's dispatch to them adds nothing.
    auto_cp, FlashQLA's default, splits a batch-1 sequence over the SMs (intra-card context parallelism)."""

    def prefill(
        self, q, k, v, g, beta, initial_state=None, output_final_state=False, chunk_size=64,
        use_qk_l2norm_in_kernel=False,
    ):  # fmt: skip
        """FlashQLA's chunk_gated_delta_rule over [B, T, H, *] inputs (Backend.prefill gives the shapes) -> (o, final
        state or None); `use_qk_l2norm_in_kernel` normalizes q and k by fla's L2 norm first (fla_l2norm), not by
        FlashQLA's own. Raises Unsupported for a chunk size other than 64 or key and value heads other than 128."""
        import flash_qla

        if chunk_size != 64:
            raise Unsupported("FlashQLA uses chunks of 64 on SM90/SM100")
        if q.shape[-1] != 128 or v.shape[-1] != 128:
            raise Unsupported(f"FlashQLA takes key and value heads of 128, not {q.shape[-1]} and {v.shape[-1]}")
        if use_qk_l2norm_in_kernel:
            # FlashQLA's own q/k norm is a torch.compile'd function (flash_qla/utils/math.py): Dynamo's guards on
            # every call, and Inductor's kernel, not the Triton kernel fla-chunk's layers run. With fla's, a layer's
            # glue is the same whichever GDN backend it takes: what the two backends' layers differ by is the GDN
            # kernel, what their floors compare (results/floor-h200-v6: a FlashQLA layer sat 0.2-1.6 ms further
            # above its floor than a fla-chunk one, unexplained)
            q, k = fla_l2norm(q), fla_l2norm(k)
        return flash_qla.chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=False,
        )  # fmt: skip

    def implementation(self, pass_: str) -> str:
        """FlashQLA's and TileLang's versions; for training, whose q/k L2 norm a layer's call takes (a fused layer's
        prefill normalizes q and k itself, in slot_conv, and kernel-scope inputs come normalized)."""
        what = f"flash_qla {_version('flash-qla')} (TileLang {_version('tilelang')})"
        return what + (", q/k L2 norm by fla's kernel" if pass_ == "train" else "")


@register(
    GDN,
    "fla-recurrent",
    ("cuda",),
    "fla fused_recurrent_gated_delta_rule (Triton, token by token)",
    probe_fn=_probe_fla,
    passes=("prefill", "decode"),
)
class FlaRecurrent(Backend):
    """fla's fused_recurrent_gated_delta_rule: the recurrence token by token in one Triton kernel; its step is a
    sequence of one token. Forward only: fla 0.6's backward of it raises NotImplementedError."""

    def prefill(
        self, q, k, v, g, beta, initial_state=None, output_final_state=False, chunk_size=64,
        use_qk_l2norm_in_kernel=False,
    ):  # fmt: skip
        """fla fused_recurrent_gated_delta_rule over [B, T, H, *] inputs -> (o, final state or None); `chunk_size`
        is ignored (there are no chunks)."""
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

        return fused_recurrent_gated_delta_rule(
            q, k, v, g=g, beta=beta, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )  # fmt: skip

    def step(self, q, k, v, g, beta, state, **options):
        """One decode token: [B, H, *] inputs and state [B, H, dk, dv] -> (o [B, H, dv], new state), as a sequence
        of one token; `options` (Backend.step) go to fla's kernel, which applies the gates inside."""
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

        q, k, v, g, beta = (t.unsqueeze(1) for t in (q, k, v, g, beta))
        # g and beta by name: fla 0.6 put gk and gv between them, so a positional beta would be taken for gk
        o, state = fused_recurrent_gated_delta_rule(
            q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True, **options
        )
        return o.squeeze(1), state


def _l2norm(q, k, normalize: bool):
    return (F.normalize(q, dim=-1), F.normalize(k, dim=-1)) if normalize else (q, k)


class _TorchGDN(Backend):
    """The torch backends' shared decode: one recurrent step of the reference (reference.gdn_step)."""

    def step(
        self, q, k, v, g, beta, state, use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, A_log=None,
        dt_bias=None, use_beta_sigmoid_in_kernel=False,
    ):  # fmt: skip
        """One decode token: q, k [B, H, dk], v [B, H, dv], g and beta [B, H], state [B, H, dk, dv] fp32 ->
        (o [B, H, dv] in v's dtype, new state). Raw gates (Backend.step) are applied first, in fp32 at least as
        fla's kernel does: the decay by reference.gdn_decay (the glue's torch twin of fused_gdn_gate), then sigmoid."""
        if use_gate_in_kernel:
            g = reference.gdn_decay(g, A_log, dt_bias)
        if use_beta_sigmoid_in_kernel:
            beta = torch.sigmoid(beta.to(reference.compute_dtype(beta)))
        o, state = reference.gdn_step(*_l2norm(q, k, use_qk_l2norm_in_kernel), v, g, beta, state)
        return o.to(v.dtype), state


@register(GDN, "torch-chunk", ("cpu", "cuda"), "pure-torch chunked reference (hhbench.kernels.reference)")
class TorchChunk(_TorchGDN):
    """The pure-torch chunked form (reference.gdn_chunk), on CPU and CUDA; its matmuls are the ones the analytic
    model counts."""

    def prefill(
        self, q, k, v, g, beta, initial_state=None, output_final_state=False, chunk_size=64,
        use_qk_l2norm_in_kernel=False,
    ):  # fmt: skip
        """reference.gdn_chunk over [B, T, H, *] inputs, chunks of `chunk_size` tokens -> (o in v's dtype, final
        state in the compute dtype, fp32, or None)."""
        q, k = _l2norm(q, k, use_qk_l2norm_in_kernel)
        return reference.gdn_chunk(
            q, k, v, g, beta, chunk_size, initial_state=initial_state, output_final_state=output_final_state
        )


@register(GDN, "torch-recurrent", ("cpu", "cuda"), "pure-torch recurrence, token by token: the oracle")
class TorchRecurrent(_TorchGDN):
    """The pure-torch recurrence token by token (reference.gdn_recurrent): the oracle the other GDN backends are
    checked against."""

    def prefill(
        self, q, k, v, g, beta, initial_state=None, output_final_state=False, chunk_size=64,
        use_qk_l2norm_in_kernel=False,
    ):  # fmt: skip
        """reference.gdn_recurrent over [B, T, H, *] inputs -> (o in v's dtype, final state (fp32) or None);
        `chunk_size` is ignored."""
        q, k = _l2norm(q, k, use_qk_l2norm_in_kernel)
        return reference.gdn_recurrent(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state
        )
