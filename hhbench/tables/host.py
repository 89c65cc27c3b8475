"""Whether a measured step was host-bound, from its row: the tables' reading of `extra.host_ms`
(hhbench.measure.timing.host_ms, the host time to issue one eager step). Without torch, as the tables are."""

import math

import pandas as pd

# An eager step issued in at least this share of its latency is host-bound: its GPU waits for launches for most of the
# step, so the latency is the host's time and says little about its kernels (results/floor-h200-v10: a 16K prefill
# with host_ms 1.77 ms read 1.86 ms; in another process on the same machine, its calls issued back to back in 1.10 ms
# each, it read 1.57 ms, its kernels' GPU time 1.56 ms: results/layer-overhead-h200-v2).
HOST_BOUND_SHARE = 0.9


def host_bound(issue_ms: object, latency_ms: float) -> bool | None:
    """Whether a step issued in `issue_ms` (a row's extra.host_ms) with a latency of `latency_ms` is host-bound
    (HOST_BOUND_SHARE); None where `issue_ms` is no measured time (absent: CUDA graphs, the CPU; null, NaN, not a
    number), as a row file edited by hand may hold."""
    if isinstance(issue_ms, bool) or not isinstance(issue_ms, int | float) or math.isnan(issue_ms):
        return None
    return bool(issue_ms >= HOST_BOUND_SHARE * latency_ms)


def host_times(frame: pd.DataFrame) -> pd.Series:
    """Each row's extra.host_ms as its row file holds it (None where its extra has none), for host_bound to read."""
    return frame["extra"].map(lambda extra: extra.get("host_ms") if isinstance(extra, dict) else None)
