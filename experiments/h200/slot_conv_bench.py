"""slot_conv alone (issue 12): in results/profile-h200-v2 its kernel took 1.67 ms of a head 7:1 prefill at 64K where
the floor's conv (fla's causal_conv1d over the same q, k and v channels) took 0.58 ms, most of the layer's 1.4 ms above
its floor. Here the kernel is timed alone for a few tilings (ROWS runs of RUN tokens a program, warps), each first
checked against glue.slot_conv (its torch twin) in bf16, beside fla's conv over the same channels, on the GDN heads of
a Qwen3-1.7B head 7:1 layer (14 GDN heads: 42 slots of 128 read in place from the projection's output), B=1.
Usage: python experiments/h200/slot_conv_bench.py [contexts...] (default 16k 64k); prints one JSON line a check or
timing (results/slot-conv-h200-v2/slot_conv_bench.log)."""

import json
import sys

import torch

from hhbench.layers import glue, slot_prep
from hhbench.layers.hydrahead import HydraAttention
from hhbench.measure.timing import TimingPolicy, time_callable
from hhbench.runner.measurements import relative_error
from hhbench.spec.units import parse_count

# (ROWS, RUN, warps): slot_prep's first (4 x 8 over 2 warps since 55b6ae9; results/slot-conv-h200-v2 timed both)
TILINGS = [(4, 8, 2), (8, 8, 4), (8, 4, 4), (16, 8, 8)]
POLICY = TimingPolicy(warmup_ms=50, target_ms=300, min_reps=20, max_reps=200)


def inputs(tokens: int):
    """slot_conv's arguments as the head 7:1 layer's fused prefill gives them: views of one projection output."""
    layer = HydraAttention(2048, 16, 8, 128, (0, 9), qk_norm=True, glue="fused")
    n_slots, n_la = len(layer.fused_rows) // 128, layer.gdn.n_heads
    projection = torch.randn(1, tokens, n_slots * 128 + 2 * n_la, device="cuda", dtype=torch.bfloat16)
    slots = projection[..., : n_slots * 128].unflatten(-1, (n_slots, 128))
    a, b = projection[..., n_slots * 128 :].split(n_la, -1)
    weight = (1 + 0.3 * torch.randn(2, 128, device="cuda")).to(torch.bfloat16)
    taps = (0.5 * torch.randn(3 * n_la * 128, 4, device="cuda")).to(torch.bfloat16)
    A_log, dt_bias = torch.rand(n_la, device="cuda") * 2, torch.randn(n_la, device="cuda")
    return slots, layer.gdn_slots, weight, 1e-6, taps, a, b, A_log, dt_bias


def tile(rows: int, run: int, warps: int) -> None:
    slot_prep.CONV_ROWS, slot_prep.CONV_RUN, slot_prep.CONV_WARPS = rows, run, warps


torch.manual_seed(0)
check = inputs(4099)
for rows, run, warps in TILINGS:
    tile(rows, run, warps)
    got, want = slot_prep.slot_conv(*check)[0], glue.slot_conv(*check)[0]
    errors = [relative_error(g, w) for g, w in zip(got, want, strict=True)]
    print(json.dumps({"tiling": [rows, run, warps], "max_rel_err_vs_twin": max(errors)}), flush=True)
    assert max(errors) < 1e-2, errors
for context in sys.argv[1:] or ["16k", "64k"]:
    tokens = parse_count(context)
    args = inputs(tokens)
    channels = args[4].shape[0]
    for rows, run, warps in TILINGS:
        tile(rows, run, warps)
        timing = time_callable(lambda args=args: slot_prep.slot_conv(*args), torch.device("cuda"), POLICY)
        print(json.dumps({"context": tokens, "kernel": "slot_conv", "tiling": [rows, run, warps],
                          "median_ms": timing.median_ms, "p10_ms": timing.percentile(0.1),
                          "p90_ms": timing.percentile(0.9), "reps": len(timing.samples_ms)}), flush=True)  # fmt: skip
    from fla.modules.causal_conv1d import causal_conv1d

    x = torch.randn(1, tokens, channels, device="cuda", dtype=torch.bfloat16)
    timing = time_callable(lambda x=x, w=args[4]: causal_conv1d(x, w, activation="silu"), torch.device("cuda"), POLICY)
    print(json.dumps({"context": tokens, "kernel": "fla causal_conv1d (the floor's conv)", "channels": channels,
                      "median_ms": timing.median_ms, "reps": len(timing.samples_ms)}), flush=True)  # fmt: skip
