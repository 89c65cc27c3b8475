"""The head-level hybrid core: FA heads through an FA backend, GDN heads through a GDN backend, outputs put
back in the layer's original head order. In `streams` mode the two backends run on two CUDA streams at once.

Inputs arrive split by head kind (the layer gathers them from its fused projection); this module owns what
happens between the split and the merged [B, T, H, d] output, which is what the `kernel` scope times.
"""

import functools
from dataclasses import dataclass

import torch

from hhbench.spec.axes import SEQUENTIAL, STREAMS


@dataclass(frozen=True)
class HeadSplit:
    """Which heads of a layer are FA and which GDN, and which KV group each FA head reads."""

    n_heads: int
    fa_heads: tuple[int, ...]
    group_size: int = 1  # query heads per KV head

    @property
    def la_heads(self) -> tuple[int, ...]:
        fa = set(self.fa_heads)
        return tuple(h for h in range(self.n_heads) if h not in fa)

    @property
    def fa_groups(self) -> tuple[int, ...]:
        """The KV groups the FA heads read, in order: what the KV cache holds."""
        return tuple(sorted({h // self.group_size for h in self.fa_heads}))

    @property
    def fa_gqa_uniform(self) -> bool:
        """True when each read group serves the same number of consecutive FA heads, in order: the FA kernel can
        then take the compact K/V with native GQA; otherwise K/V are expanded per FA head."""
        groups = self.fa_groups
        if not groups or len(self.fa_heads) % len(groups):
            return False
        per = len(self.fa_heads) // len(groups)
        return all(h // self.group_size == groups[i // per] for i, h in enumerate(self.fa_heads))

    def fa_kv_index(self) -> tuple[int, ...]:
        """For each FA head, the position of its group among fa_groups (K/V expansion when not uniform)."""
        position = {g: i for i, g in enumerate(self.fa_groups)}
        return tuple(position[h // self.group_size] for h in self.fa_heads)

    def original_positions(self) -> tuple[int, ...]:
        """For each head in the original order, its position among the FA heads followed by the GDN heads."""
        order = (*self.fa_heads, *self.la_heads)
        return tuple(order.index(h) for h in range(self.n_heads))

    def la_kv_groups(self) -> tuple[int, ...]:
        """For each GDN head, its KV group: GDN heads reuse their group's keys and values."""
        return tuple(h // self.group_size for h in self.la_heads)


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


@functools.cache
def head_index(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Index tensors made once per device: a host-to-device copy inside a CUDA graph capture would be invalid."""
    return torch.tensor(heads, dtype=torch.long, device=device)


def merge_heads(split: HeadSplit, fa_out: torch.Tensor | None, la_out: torch.Tensor | None) -> torch.Tensor:
    """[..., n_fa, d] and [..., n_la, d] -> [..., H, d] in the original head order."""
    if la_out is None:
        return fa_out
    if fa_out is None:
        return la_out
    out = fa_out.new_empty(*fa_out.shape[:-2], split.n_heads, fa_out.shape[-1])
    dim = out.dim() - 2
    out.index_copy_(dim, head_index(split.fa_heads, out.device), fa_out)
    out.index_copy_(dim, head_index(split.la_heads, out.device), la_out.to(out.dtype))
    return out


@dataclass
class HybridCore:
    """The head-level core of one layer: backends, split and mode."""

    split: HeadSplit
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

    def prefill(self, fa: tuple | None, gdn: tuple | None) -> torch.Tensor:
        """The merged [B, T, H, d] output: what the kernel scope times."""
        fa_out, gdn_result = self.prefill_parts(fa, gdn)
        return merge_heads(self.split, fa_out, gdn_result[0] if gdn_result else None)

    def decode_parts(self, fa: tuple | None, gdn: tuple | None, qk_l2norm: bool = False):
        """fa = (q [B, 1, n_fa, d], k_cache, v_cache); gdn = (q, k, v, g, beta, state) with [B, n_la, *] inputs.
        Returns (fa_out [B, 1, n_fa, d] or None, (gdn_out [B, 1, n_la, d], new state) or None)."""
        fa_fn = (lambda: self.fa_backend.decode(*fa)) if fa else (lambda: None)
        gdn_fn = (lambda: self.gdn_backend.step(*gdn, use_qk_l2norm_in_kernel=qk_l2norm)) if gdn else (lambda: None)
        fa_out, gdn_result = run_both(fa_fn, gdn_fn, self.mode, self._device(fa, gdn))
        if gdn_result is not None:
            gdn_result = (gdn_result[0].unsqueeze(1), gdn_result[1])
        return fa_out, gdn_result

    def decode(self, fa: tuple | None, gdn: tuple | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        fa_out, gdn_result = self.decode_parts(fa, gdn)
        la_out, state = gdn_result if gdn_result else (None, None)
        return merge_heads(self.split, fa_out, la_out), state
