"""Does torch.profiler's with_stack crash this machine's layer step (the H200 --profile run's SIGSEGVs, issue 12)?
One head 7:1 layer-scope prefill step of the Qwen3-1.7B shape at 4K, warmed up, then profiled once with CUDA
activity and with_stack as argv[1] says (0 or 1). Run each in a process of its own: a crash is the exit status.
Usage: python experiments/h200/with_stack_check.py 0|1 [pass] (pass: prefill, train or decode; default prefill)"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from hhbench.bench.workloads import build
from hhbench.plan.grid import grid_points

with_stack = sys.argv[1] == "1"
pass_ = sys.argv[2] if len(sys.argv) > 2 else "prefill"
grid = {"models": "qwen3-1.7b", "layouts": "head", "ratios": "7:1", "contexts": "4k", "passes": pass_,
        "scopes": "layer"}  # fmt: skip
[point] = grid_points(grid, "cuda")
work = build(point, torch.device("cuda"))
for _ in range(3):
    work.run()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=with_stack) as profiler:
    work.run()
    torch.cuda.synchronize()
kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
print(f"{pass_} with_stack={with_stack}: profiled, {len(kernels)} CUDA events")
