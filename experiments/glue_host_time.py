"""hhbench's own host time in one fused layer prefill and decode step (issue 12: eager 16K prefill is host-bound, and
eager decode steps are), on the CPU:
HydraAttention's fused path with Qwen3-1.7B's head counts (16 query heads, 8 KV heads, q/k norms), every glue op and
the attention core stubbed by one allocation of its output's shape, and tiny hidden and head sizes so that the
projection GEMMs cost next to nothing. What is left is the layer's Python, its GEMMs' and views' dispatch and the
stubs' allocations: an upper bound of what hhbench's Python adds to the fla, FlashQLA and cuDNN calls a GPU step makes
(hhbench's own Triton kernels, slot_norm_rope and split-KV decode, are stubbed too: their launches are not counted).
Usage: python experiments/glue_host_time.py [steps] (default 300; more than WARMUP, 50, which are warm-up)."""

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
WARMUP = 50  # calls left out of each median: the first ones allocate and fill the caches
LAYOUTS = {"head 7:1": (3, 11), "head 3:1": (1, 5, 9, 13), "GDN layer": (), "FA layer": tuple(range(16))}


def _parts(slots, plan, weight, eps, cos, sin, into=None):
    """slot_norm_rope's outputs as its launcher makes them: `into`'s tensors, the other parts views of one buffer."""
    B, T, _, d = slots.shape
    into = into or {}
    own = [n for p, n in enumerate(plan.sizes) if p not in into]
    views = iter(slots.new_empty(B * T * d * sum(own)).split([B * T * n * d for n in own]))
    return tuple(into[p] if p in into else next(views).view(B, T, n, d) for p, n in enumerate(plan.sizes))


STUBS = glue.GlueOps(
    "stubs",
    lambda x, weight, initial_state=None, output_final_state=False: (
        torch.empty_like(x),
        x.new_empty(x.shape[0], x.shape[2], weight.shape[1]) if output_final_state else None,
    ),
    lambda x, state, weight: torch.empty_like(x),
    lambda a, A_log, dt_bias: torch.empty_like(a, dtype=torch.float32),
    lambda o, eps: torch.empty_like(o),
    lambda o, gate, eps: torch.empty_like(o),
    _parts,
    None,
    lambda slots, sources, weight, eps, conv_weight, a, b, A_log, dt_bias, output_final_state=False: (
        (
            *(slots.new_empty(*slots.shape[:2], len(sources[0]), slots.shape[3]) for _ in range(3)),
            *(torch.empty_like(a, dtype=torch.float32) for _ in range(2)),
        ),
        slots.new_empty(slots.shape[0], *conv_weight.shape) if output_final_state else None,
    ),
    lambda o_la, gate, o_fa, eps: o_la.new_empty(
        *o_la.shape[:2], o_la.shape[2] + (0 if o_fa is None else o_fa.shape[2]), o_la.shape[3]
    ),
)


class StubCore(HybridCore):
    def prefill_parts(self, fa, gdn, output_final_state=False, qk_l2norm=False):
        return (torch.empty_like(fa[0]) if fa else None), ((torch.empty_like(gdn[2]), None) if gdn else None)

    def decode_parts(self, fa, gdn, qk_l2norm=False, gates=None):
        return (torch.empty_like(fa[0]) if fa else None), ((torch.empty_like(gdn[2])[:, None], None) if gdn else None)


def _median(calls, steps: int) -> dict:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        calls()
        times.append((time.perf_counter() - start) * 1e6)
    times = sorted(times[WARMUP:])
    return {"median_us": round(statistics.median(times)), "p10_us": round(times[len(times) // 10]),
            "p90_us": round(times[9 * len(times) // 10])}  # fmt: skip


def step_us(fa_heads, steps: int) -> dict:
    """{"prefill": ..., "decode": ...}: a prefill of TOKENS tokens and a decode step after them, each the median,
    p10 and p90 (us) of `steps` calls, the first WARMUP left out."""
    layer = HydraAttention(HIDDEN, 16, 8, HEAD_DIM, fa_heads=fa_heads, qk_norm=True, glue="auto")
    core = StubCore(None, None, "sequential", 64)
    layer._core = lambda *args: core
    layer._glue_ops = lambda *args: STUBS
    x = torch.randn(1, TOKENS, HIDDEN)
    cache = layer.new_cache(1, TOKENS + 1, "cpu", x.dtype)

    def decode():
        cache.length = TOKENS  # each step writes the same position
        layer(x[:, :1], cache=cache)

    with torch.no_grad():
        layer(x, cache=cache)
        return {"prefill": _median(lambda: layer(x), steps), "decode": _median(decode, steps)}


def steps_of(argv: list[str]) -> int:
    """The step count `argv` (the script's arguments) asks for, 300 without one; SystemExit(2) after one line on
    stderr unless it is an integer above WARMUP (with WARMUP or fewer steps no time is left to take a median of)."""
    if not argv:
        return 300
    if len(argv) > 1 or not argv[0].isdigit() or int(argv[0]) <= WARMUP:
        print(f"glue_host_time.py: give one step count above {WARMUP} (the warm-up), not {' '.join(argv)!r}",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    return int(argv[0])


if __name__ == "__main__":
    steps = steps_of(sys.argv[1:])
    torch.set_num_threads(1)
    rows = {name: step_us(heads, steps) for name, heads in LAYOUTS.items()}
    print(json.dumps({"steps": steps, "layouts": rows, "env": capture_env({"argv": sys.argv[1:]})}, indent=2,
                     default=str))  # fmt: skip
