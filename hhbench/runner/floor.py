"""The floor as a measurement unit: on a layer- or model-scope point whose latency was measured, time the point's
necessary kernels alone (hhbench.bench.floor) and write `floor_ms`, `vs_floor` (latency / floor) and
`extra.floor_parts_ms` (each part's median alone, per distinct layer, with its count). `floor_ms` is the parts as
often as the point runs each, per layer like the latency at layer scope: their medians summed, or, where the point
is timed as one CUDA graph (decode), all of them back to back captured as one graph and timed (`extra.floor_method`
says which): a decode part takes microseconds, and each part alone would pay its own graph launch, which the step
pays once. It tells whether a slowdown is the architecture (a high floor) or the implementation (latency far above
its floor). It raises what its parts raise; the caller keeps that on the row."""

import torch

from hhbench.bench.floor import floor_layers, floor_parts
from hhbench.measure.timing import TimingPolicy, time_callable, time_each
from hhbench.plan.grid import Point
from hhbench.rows.schema import OK, Row
from hhbench.spec.axes import Pass, Scope

SCOPES = (Scope.LAYER, Scope.MODEL)


def applies(point: Point, row: Row) -> bool:
    return point.floor and point.scope in SCOPES and row.status == OK and row.latency_ms is not None


def measure(point: Point, device: torch.device, policy: TimingPolicy, row: Row) -> None:
    """Fill the row's floor fields (module docstring); decode parts are timed as CUDA graphs like the step."""
    if not applies(point, row):
        return
    graph = point.pass_ is Pass.DECODE and device.type == "cuda"
    same = TimingPolicy(**{**policy.__dict__, "graph": graph})
    parts = floor_parts(point, device)
    times = time_each({str(i): part.run for i, part in enumerate(parts)}, device, same)
    by_layer: dict[str, dict] = {}
    for i, part in enumerate(parts):
        entry = by_layer.setdefault(part.layer, {"count": part.count, "parts_ms": {}})
        entry["parts_ms"][part.name] = times[str(i)]
    if graph:

        def every_part():
            for part in parts:
                for _ in range(part.count):
                    part.run()

        total, method = time_callable(every_part, device, same).median_ms, "every part back to back, one CUDA graph"
    else:
        total, method = sum(times[str(i)] * part.count for i, part in enumerate(parts)), "the parts' medians summed"
    row.floor_ms = total / floor_layers(point)
    row.vs_floor = row.latency_ms / row.floor_ms
    row.extra["floor_parts_ms"] = by_layer
    row.extra["floor_method"] = method
