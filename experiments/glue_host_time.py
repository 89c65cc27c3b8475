"""hhbench's own host time in one fused layer prefill step (issue 12: eager 16K prefill is host-bound), on the CPU:
HydraAttention's fused path with Qwen3-1.7B's head counts (16 query heads, 8 KV heads, q/k norms), every glue op and
the attention core stubbed by one allocation of its output's shape, and tiny hidden and head sizes so that the
projection GEMMs cost next to nothing. What is left is the layer's Python, its GEMMs' and views' dispatch and the
stubs' allocations: an upper bound of what hhbench adds to the fla, FlashQLA and cuDNN calls a GPU step makes.
Usage: python experiments/glue_host_time.py [steps] (default 300; the first 50 are warm-up)."""

import json
import statistics
import sys
import time

import torch

from hhbench.kernels.hybrid import HybridCore
from hhbench.layers import glue
from hhbench.layers.hydrahead import HydraAttention
from hhbench.measure.env import capture_env

HIDDEN, HEAD_DIM, TOKENS = 128, 8, 2
LAYOUTS = {"head 7:1": (3, 11), "head 3:1": (1, 5, 9, 13), "GDN layer": (), "FA layer": tuple(range(16))}


def _parts(slots, plan, weight, eps, cos, sin):
    B, T, _, d = slots.shape
    return plan.split(slots.new_empty(B * T * len(plan.sources) * d), B, T, d)


STUBS = glue.GlueOps(
    "stubs",
    lambda x, weight, initial_state=None, output_final_state=False: (torch.empty_like(x), None),
    lambda x, state, weight: torch.empty_like(x),
    lambda a, A_log, dt_bias: torch.empty_like(a, dtype=torch.float32),
    lambda o, eps: torch.empty_like(o),
    lambda o, gate, eps: torch.empty_like(o),
    _parts,
    None,
)


class StubCore(HybridCore):
    def prefill_parts(self, fa, gdn, output_final_state=False, qk_l2norm=False):
        return (torch.empty_like(fa[0]) if fa else None), ((torch.empty_like(gdn[2]), None) if gdn else None)


def step_us(fa_heads, steps: int) -> dict:
    layer = HydraAttention(HIDDEN, 16, 8, HEAD_DIM, fa_heads=fa_heads, qk_norm=True, glue="auto")
    core = StubCore(None, None, "sequential", 64)
    layer._core = lambda *args: core
    layer._glue_ops = lambda *args: STUBS
    x = torch.randn(1, TOKENS, HIDDEN)
    times = []
    with torch.no_grad():
        for _ in range(steps):
            start = time.perf_counter()
            layer(x)
            times.append((time.perf_counter() - start) * 1e6)
    times = sorted(times[50:])
    return {"median_us": round(statistics.median(times)), "p10_us": round(times[len(times) // 10]),
            "p90_us": round(times[9 * len(times) // 10])}  # fmt: skip


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    torch.set_num_threads(1)
    rows = {name: step_us(heads, steps) for name, heads in LAYOUTS.items()}
    print(json.dumps({"steps": steps, "layouts": rows, "env": capture_env({"argv": sys.argv[1:]})}, indent=2,
                     default=str))  # fmt: skip
