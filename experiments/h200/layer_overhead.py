"""Where a layer-scope step's time goes beyond its kernels (issue 12): for head 7:1 and layer 3:1 on the
Qwen3-1.7B shape, the event-timed latency, the summed CPU time of the step's calls with the GPU not waited for,
every synchronizing CUDA call the step makes (torch.cuda.set_sync_debug_mode), cProfile's top functions, and one step
under torch.profiler without Python stacks: its CUDA runtime calls by host time, its kernels by GPU time.
Usage: python experiments/h200/layer_overhead.py [contexts...] (default 4k 16k); GDN_BACKEND env picks the GDN
backend (default auto; a comma list profiles each), VARIANTS the layouts (default head:7:1,layer:3:1), PASSES the
passes (default prefill; train: a training step's host time grew with its context in results/floor-h200-v10, 8.2 to
12.5 ms for head 7:1 with FlashQLA from 16K to 128K, as if a call in it waited for the GPU)."""

import cProfile
import io
import os
import pstats
import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from hhbench.bench.workloads import build
from hhbench.measure.timing import TimingPolicy, time_callable
from hhbench.plan.grid import grid_points

contexts = ",".join(sys.argv[1:]) or "4k,16k"
grid = {
    "models": "qwen3-1.7b",
    "layouts": "head,layer",
    "ratios": "7:1,3:1",
    "contexts": contexts,
    "passes": os.environ.get("PASSES", "prefill").split(","),
    "scopes": "layer",
    "gdn_backend": os.environ.get("GDN_BACKEND", "auto").split(","),
}
device = torch.device("cuda")
for point in grid_points(grid, "cuda"):
    if point.spec.label not in os.environ.get("VARIANTS", "head:7:1,layer:3:1").split(","):
        continue
    work = build(point, device)
    timing = time_callable(work.run, device, TimingPolicy(warmup_ms=200, target_ms=300, min_reps=10, max_reps=50))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        work.run()
    cpu_ms = (time.perf_counter() - start) / 20 * 1e3
    torch.cuda.synchronize()
    print(
        f"\n## {point.spec.label} {point.pass_.value} {point.context} ({point.gdn_backend}): latency {timing.median_ms:.3f} ms "
        f"per run of {work.layers_per_run} layers; CPU {cpu_ms:.3f} ms per run enqueued without waiting"
    )
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        work.run()
    torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for w in caught:
        print("SYNC:", str(w.message)[:300])
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(10):
        work.run()
    profiler.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(45)
    print(out.getvalue()[-16000:])
    # One step under torch.profiler without Python stacks (`sweep --profile` asks for them and its workers died of
    # SIGSEGV on the H200): the host's CUDA runtime calls, where one that waits for the GPU (a synchronize, a copy
    # from pageable memory) is a long cuda* event whichever library made it, the closing synchronize aside; and the
    # step's kernels by GPU time.
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as traced:
        work.run()
        torch.cuda.synchronize()
    events = traced.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))
