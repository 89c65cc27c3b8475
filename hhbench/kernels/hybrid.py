"""The head-level hybrid core: FA heads through an FA backend, GDN heads through a GDN backend. In `streams` mode
the two backends run on two CUDA streams at once.

Inputs arrive split by head kind (the layer gathers them from its fused projection, hhbench.spec.layout.HeadSplit
says which head is which); this module owns the two backend calls and returns their outputs apart, FA heads'
[B, T, n_fa, d] and GDN heads' [B, T, n_la, d]: what the `kernel` scope times. Putting the heads back in their
order belongs to the layer (HydraAttention), whose per-head norms and output projection read them.
"""

import contextlib
import functools
from dataclasses import dataclass

import torch

from hhbench.spec.axes import SEQUENTIAL, STREAMS


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device, priority=-1)  # high priority: FA's blocks are dispatched first


def run_both(fa_fn, gdn_fn, mode: str, device: torch.device):
    """Run the two parts and return (fa_out, gdn_out). In streams mode FA is launched first, on a high-priority side
    stream, and GDN's chain of small kernels fills the SMs around it. Of the orders and priorities tried on an H100
    (results/gpu-targets-h100/README.md) this was the only one never slower than sequential."""
    if mode != STREAMS or device.type != "cuda":
        return fa_fn(), gdn_fn()
    main = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        fa_out = fa_fn()
    gdn_out = gdn_fn()
    main.wait_stream(side)
    if isinstance(fa_out, torch.Tensor):
        fa_out.record_stream(main)  # allocated on the side stream, freed after use on the main one
    return fa_out, gdn_out


def launch_device(t: torch.Tensor):
    """A context for launching Triton kernels on `t`'s GPU: it makes t's CUDA device the current one where it is not
    (Triton launches on the current device, whatever its tensors' device: a layer on cuda:1 under a current cuda:0
    would have its kernels run on cuda:0 with cuda:1's pointers, an illegal address); nothing for a CPU tensor or
    one on the current device (Triton's interpreter, and the usual case, pay no device switch)."""
    if t.device.type != "cuda" or t.device.index in (None, torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def grad_flows(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on `tensors` (None among them skipped): grad mode on, and one of them requires
    its gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@functools.cache
def head_index(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Index tensors made once per device: a host-to-device copy inside a CUDA graph capture would be invalid. Made
    outside inference mode, so that training may save them for its backward (index_select's) after an inference call
    made them."""
    with torch.inference_mode(False):
        return torch.tensor(heads, dtype=torch.long, device=device)


@dataclass
class HybridCore:
    """The head-level core of one layer: its two resolved backends (kernels.registry.Backend; None where the layer
    has no head of that kind), the mode (hhbench.spec.axes.MODES) and the GDN chunk size in tokens."""

    fa_backend: object
    gdn_backend: object
    mode: str = SEQUENTIAL
    chunk_size: int = 64

    def _device(self, fa, gdn) -> torch.device:
        return (fa or gdn)[0].device

    def prefill_parts(self, fa: tuple | None, gdn: tuple | None, output_final_state: bool = False,
                      qk_l2norm: bool = False):  # fmt: skip
        """fa = (q, k, v) of the FA heads; gdn = (q, k, v, g, beta) of the GDN heads (q and k L2-normalized, or
        normalized by the GDN backend with qk_l2norm). Returns (fa_out [B, T, n_fa, d] or None,
        (gdn_out [B, T, n_la, d], final state) or None)."""
        fa_fn = (lambda: self.fa_backend.prefill(*fa)) if fa else (lambda: None)
        gdn_fn = (
            (
                lambda: self.gdn_backend.prefill(
                    *gdn,
                    output_final_state=output_final_state,
                    chunk_size=self.chunk_size,
                    use_qk_l2norm_in_kernel=qk_l2norm,
                )
            )  # fmt: skip
            if gdn
            else (lambda: None)
        )
        return run_both(fa_fn, gdn_fn, self.mode, self._device(fa, gdn))

    def decode_parts(self, fa: tuple | None, gdn: tuple | None, qk_l2norm: bool = False, gates: tuple | None = None):
        """fa = (q [B, 1, n_fa, d], k_cache, v_cache); gdn = (q, k, v, g, beta, state) with [B, n_la, *] inputs;
        `gates` = (A_log, dt_bias) [n_la]: g and beta come raw (the gate inputs a and b) and the GDN backend's step
        applies the decay gate and beta's sigmoid (Backend.step). Returns (fa_out [B, 1, n_fa, d] or None,
        (gdn_out [B, 1, n_la, d], new state) or None)."""
        options = {"use_qk_l2norm_in_kernel": qk_l2norm}
        if gates is not None:
            options.update(use_gate_in_kernel=True, A_log=gates[0], dt_bias=gates[1], use_beta_sigmoid_in_kernel=True)
        fa_fn = (lambda: self.fa_backend.decode(*fa)) if fa else (lambda: None)
        gdn_fn = (lambda: self.gdn_backend.step(*gdn, **options)) if gdn else (lambda: None)
        fa_out, gdn_result = run_both(fa_fn, gdn_fn, self.mode, self._device(fa, gdn))
        if gdn_result is not None:
            gdn_result = (gdn_result[0].unsqueeze(1), gdn_result[1])
        return fa_out, gdn_result
