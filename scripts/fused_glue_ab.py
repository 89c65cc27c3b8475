"""Device experiment: the HydraHead layer's reference glue against its fused glue (issue 12, item 1), same process,
same points. Layer scope, qwen3-1.7b, B=1, bf16, default backends (auto). Prints one line per point and pass:
ms per layer with the reference glue, with the fused glue, their ratio, and the fused point's relative error
against the fp32 reference (hhbench's own correctness check).

    python scripts/fused_glue_ab.py [prefill,decode,train] [16k,64k,128k]
"""

import sys

import torch

from hhbench.bench.workloads import build
from hhbench.layers.hydrahead import HydraAttention
from hhbench.measure.timing import TimingPolicy, time_callable
from hhbench.plan.grid import grid_points
from hhbench.runner.measurements import check_correctness

device = torch.device("cuda")
passes = sys.argv[1] if len(sys.argv) > 1 else "prefill,decode,train"
contexts = sys.argv[2] if len(sys.argv) > 2 else "16k,64k,128k"
fused_glue = HydraAttention._glue_ops
reference_glue = lambda self, core, device: None  # noqa: E731  (forces the reference glue)


def per_layer_ms(point) -> float:
    workload = build(point, device)
    timing = time_callable(workload.run, device, TimingPolicy(target_ms=500, graph=workload.graph))
    return timing.median_ms / workload.layers_per_run


for pass_ in passes.split(","):
    for context in contexts.split(","):
        if pass_ == "train" and context == "128k":
            continue  # layer-scope train at 128K: activations beyond what this comparison needs
        points = grid_points({"models": "qwen3-1.7b", "layouts": "head,layer", "ratios": "7:1,3:1", "contexts": context,
                              "passes": pass_, "scopes": "layer"}, "cuda")  # fmt: skip
        for point in points:
            times = {}
            for name, glue in (("reference", reference_glue), ("fused", fused_glue)):
                HydraAttention._glue_ops = glue
                times[name] = per_layer_ms(point)
                torch.cuda.empty_cache()
            error = check_correctness(point, device)
            print(f"{pass_:7s} {context:>4s} {point.spec.label:10s} reference {times['reference']:8.3f} ms"
                  f"  fused {times['fused']:8.3f} ms  {times['reference'] / times['fused']:5.2f}x  rel.err {error:.1e}",
                  flush=True)  # fmt: skip
