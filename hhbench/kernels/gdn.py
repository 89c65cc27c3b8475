"""Gated DeltaNet backends: fla's Triton kernels and the pure-torch reference forms.

`prefill(q, k, v, g, beta, initial_state, output_final_state, chunk_size)` runs a whole sequence; `step(q, k, v, g, beta,
state)` one decode token with [B, H, *] inputs. q and k arrive L2-normalized, unless `use_qk_l2norm_in_kernel` (fla's
flag; the layer's fused path sets it) asks the backend to normalize them; g as log decay, beta in (0, 1).
"""

import torch.nn.functional as F

from hhbench.errors import Unsupported
from hhbench.kernels import reference
from hhbench.kernels.registry import GDN, Backend, register


def _probe_fla():
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401  (needs triton and a GPU build)


@register(
    GDN,
    "fla-chunk",
    ("cuda",),
    "fla chunk_gated_delta_rule (Triton, chunked WY form)",
    probe_fn=_probe_fla,
    passes=("prefill", "train"),
)
class FlaChunk(Backend):
    def prefill(
        self, q, k, v, g, beta, initial_state=None, output_final_state=False, chunk_size=64,
        use_qk_l2norm_in_kernel=False,
    ):  # fmt: skip
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        if chunk_size != 64:
            raise Unsupported("fla's chunk kernels use chunks of 64")

        return chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )  # fmt: skip


@register(
    GDN,
    "fla-recurrent",
    ("cuda",),
    "fla fused_recurrent_gated_delta_rule (Triton, token by token)",
    probe_fn=_probe_fla,
)
class FlaRecurrent(Backend):
    def prefill(
        self, q, k, v, g, beta, initial_state=None, output_final_state=False, chunk_size=64,
        use_qk_l2norm_in_kernel=False,
    ):  # fmt: skip
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

        return fused_recurrent_gated_delta_rule(
            q, k, v, g=g, beta=beta, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )  # fmt: skip

    def step(self, q, k, v, g, beta, state, use_qk_l2norm_in_kernel=False):
        o, state = self.prefill(
            *(t.unsqueeze(1) for t in (q, k, v, g, beta)), initial_state=state, output_final_state=True,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )  # fmt: skip
        return o.squeeze(1), state


def _l2norm(q, k, normalize: bool):
    return (F.normalize(q, dim=-1), F.normalize(k, dim=-1)) if normalize else (q, k)


class _TorchGDN(Backend):
    def step(self, q, k, v, g, beta, state, use_qk_l2norm_in_kernel=False):
        o, state = reference.gdn_step(*_l2norm(q, k, use_qk_l2norm_in_kernel), v, g, beta, state)
        return o.to(v.dtype), state


@register(GDN, "torch-chunk", ("cpu", "cuda"), "pure-torch chunked reference (hhbench.kernels.reference)")
class TorchChunk(_TorchGDN):
    def prefill(
        self, q, k, v, g, beta, initial_state=None, output_final_state=False, chunk_size=64,
        use_qk_l2norm_in_kernel=False,
    ):  # fmt: skip
        q, k = _l2norm(q, k, use_qk_l2norm_in_kernel)
        return reference.gdn_chunk(
            q, k, v, g, beta, chunk_size, initial_state=initial_state, output_final_state=output_final_state
        )


@register(GDN, "torch-recurrent", ("cpu", "cuda"), "pure-torch recurrence, token by token: the oracle")
class TorchRecurrent(_TorchGDN):
    def prefill(
        self, q, k, v, g, beta, initial_state=None, output_final_state=False, chunk_size=64,
        use_qk_l2norm_in_kernel=False,
    ):  # fmt: skip
        q, k = _l2norm(q, k, use_qk_l2norm_in_kernel)
        return reference.gdn_recurrent(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state
        )
