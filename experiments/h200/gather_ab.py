"""The fused layer's gathers of GDN heads' shared k and v (`_take` in hhbench/layers/hydrahead.py: GQA groups whose
heads are GDN heads, each head taking its group's k and v), timed against other ways of making the same tensor
(issue 12: one `aten::gather` kernel took 0.78 ms of head 7:1's 9.3 ms prefill step at 64K on an H200, where moving
its bytes once at the H200's bandwidth would take about 0.2 ms; results/layer-overhead-h200). Each way is checked
equal to index_select's before it is timed (CUDA events, hhbench's timing). hhbench now gathers by 8-byte words
(select_slots).
Usage: python experiments/h200/gather_ab.py [contexts...] (default 16k 64k); GDN_BACKEND env as layer_overhead.py;
DEVICE=cpu runs it on the CPU (a check of the script, not a measurement)."""

import os
import sys

import torch

import hhbench.layers.hydrahead as hydrahead
from hhbench.bench.workloads import build
from hhbench.measure.timing import TimingPolicy, time_callable
from hhbench.plan.grid import grid_points


def runs(slots: tuple[int, ...]) -> list[tuple[int, int]]:
    """Maximal ascending runs of consecutive slots, as (start, stop) pairs."""
    found = [[slots[0], slots[0] + 1]]
    for s in slots[1:]:
        if s == found[-1][1]:
            found[-1][1] += 1
        else:
            found.append([s, s + 1])
    return [tuple(r) for r in found]


def by_words(dtype: torch.dtype):
    """index_select of the slots viewed as words of `dtype` (the same bytes; hhbench's _as_words), or None where they
    cannot be viewed."""

    def way(t, idx, slots):
        words = hydrahead._as_words(t, dtype)
        return None if words is None else words.index_select(2, idx).view(t.dtype)

    return way


WAYS = {
    "index_select by elements (before)": lambda t, idx, slots: t.index_select(2, idx),
    "select_slots, 8-byte words (now)": lambda t, idx, slots: hydrahead.select_slots(t, idx),
    "16-byte words (complex128 view)": by_words(torch.complex128),
    "4-byte words (int32 view)": by_words(torch.int32),
    "advanced indexing": lambda t, idx, slots: t[:, :, idx],
    "cat of runs": lambda t, idx, slots: torch.cat([t[:, :, a:b] for a, b in runs(slots)], dim=2),
    "contiguous, then index_select": lambda t, idx, slots: t.contiguous().index_select(2, idx),
}


def takes_of_one_step(work) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """(tensor, slots) of every _take call one run of `work` makes."""
    seen, take = [], hydrahead._take

    def spy(t, slots):
        seen.append((t, slots))
        return take(t, slots)

    hydrahead._take = spy
    try:
        work.run()
    finally:
        hydrahead._take = take
    return seen


def compare_ways(t: torch.Tensor, slots: tuple[int, ...], device: torch.device, policy: TimingPolicy) -> None:
    """Each way checked equal to index_select, then timed; one line each."""
    idx = torch.tensor(slots, device=t.device)
    expected = WAYS["index_select by elements (before)"](t, idx, slots)
    moved = 2 * expected.numel() * expected.element_size()  # read once, written once
    print(f"\n## t {tuple(t.shape)} strides {t.stride()} -> {len(slots)} slots in {len(runs(slots))} runs, "
          f"{moved / 1e6:.0f} MB moved")  # fmt: skip
    for name, way in WAYS.items():
        out = way(t, idx, slots)
        if out is None:
            print(f"{name}: the layout cannot be viewed so, not timed")
            continue
        if not torch.equal(out, expected):
            print(f"{name}: differs, not timed")
            continue
        timing = time_callable(lambda way=way: way(t, idx, slots), device, policy)
        spread = f"{timing.percentile(0.1):.3f}-{timing.percentile(0.9):.3f}"
        print(f"{name}: {timing.median_ms:.3f} ms ({spread}), {moved / timing.median_ms / 1e9:.2f} TB/s, "
              f"contiguous out {out.is_contiguous()}")  # fmt: skip


device = torch.device(os.environ.get("DEVICE", "cuda"))
contexts = ",".join(sys.argv[1:]) or "16k,64k"
grid = {"models": "qwen3-1.7b", "layouts": "head", "ratios": "7:1", "contexts": contexts, "passes": "prefill",
        "scopes": "layer", "gdn_backend": os.environ.get("GDN_BACKEND", "auto")}  # fmt: skip
policy = TimingPolicy(warmup_ms=50, target_ms=200, min_reps=10, max_reps=100)
if device.type == "cpu":  # the fused path (auto takes it on CUDA only) with its torch twins, to check the script
    hydrahead.HydraAttention._glue_ops = lambda self, core, device: hydrahead.glue.TORCH
for point in grid_points(grid, device.type):
    print(f"\n# context {point.context}, GDN backend {point.gdn_backend}")
    for t, slots in takes_of_one_step(build(point, device)):
        if slots != tuple(range(slots[0], slots[0] + len(slots))):  # a run is a view: no kernel
            compare_ways(t, slots, device, policy)
