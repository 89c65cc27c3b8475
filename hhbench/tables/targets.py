"""The performance targets, checked on a run's measured rows. Each check lists the rows it read, so a reader
can find them in the run.

The kernels issue (kernel scope):
1. streams: the head-level core on two CUDA streams is never slower than sequential (beyond the rows' noise),
   and at least 1.2x faster at 4K, batch 4, 16 FA + 16 GDN heads;
2. parts: the head-level kernel scope takes at most 5% more than its FA and GDN parts timed alone;
3. head 7:1 against layer 3:1 (per layer) at 64K prefill: at least 1.45x faster;
4. decode at 32K-128K: the FA heads read their KV cache at >= 85% of the card's measured copy bandwidth.

Issue 12 (layer and model scope, the Qwen3-1.7B shape): declared as data in LAYER_TARGETS below (suite
suites/floor-h200.toml measures exactly their points).
"""

from dataclasses import dataclass, field

import pandas as pd

from hhbench.rows.schema import OK, markdown_table
from hhbench.rows.sources import Run
from hhbench.tables.host import HOST_BOUND_SHARE, host_bound, host_times

KERNEL_KEY = ["model", "variant", "context", "batch", "pass", "dtype", "fa_backend", "gdn_backend"]


FLOOR_INVALID = "floor invalid"  # a floor target's verdict where a row's floor is above the layer's p90


@dataclass
class Check:
    """One target's verdict ("met", "not met", "no data", or for a floor target "floor invalid": some row's floor
    is above the layer's p90, so it bounds nothing), a one-line summary and the rows it read (evidence)."""

    target: str
    evidence: pd.DataFrame
    verdict: str  # met | not met | no data | floor invalid
    summary: str


@dataclass
class Targets:
    """The checks of one run's rows against the performance targets."""

    run: str
    checks: list[Check] = field(default_factory=list)

    def to_markdown(self) -> str:
        """Markdown: a table of the verdicts, then each check's evidence; a sentence where nothing was checked."""
        blocks = [f"## Performance targets: {self.run}\n"]
        if not self.checks:  # check_targets checks ok rows only: an analytic, failed or quality-only run has none
            return "\n".join([*blocks, "no measured (ok) performance rows: no target to check"]) + "\n"
        blocks.append(
            markdown_table(
                pd.DataFrame([{"target": c.target, "verdict": c.verdict, "summary": c.summary} for c in self.checks])
            )
        )
        for check in self.checks:
            if not check.evidence.empty:
                blocks.append(f"\n### {check.target}\n\n{markdown_table(check.evidence)}")
        return "\n".join(blocks) + "\n"


def streams_check(rows: pd.DataFrame) -> Check:
    """Target 1 (module docstring): head-level rows timed sequential and on two streams, paired by KERNEL_KEY;
    met when no pair is slower on streams beyond noise (p10 above the other's p90) and head 1:1 at 4K, batch 4,
    prefill is at least 1.2x faster with every FA backend."""
    head = rows[rows["variant"].str.startswith("head:")]
    pairs = head[head["mode"] == "sequential"].merge(
        head[head["mode"] == "streams"], on=KERNEL_KEY, suffixes=("_seq", "_str")
    )
    if pairs.empty:
        return Check("streams", pd.DataFrame(), "no data", "no head-level point measured in both modes")
    evidence = pairs[KERNEL_KEY[1:5] + ["fa_backend"]].copy()
    evidence["sequential_ms"] = pairs["latency_ms_seq"].round(4)
    evidence["streams_ms"] = pairs["latency_ms_str"].round(4)
    evidence["speedup"] = (pairs["latency_ms_seq"] / pairs["latency_ms_str"]).round(3)
    slower = (pairs["latency_ms_str"] > pairs["latency_ms_seq"]) & (
        pairs["latency_p10_ms_str"] > pairs["latency_p90_ms_seq"]
    )
    evidence["streams_slower_beyond_noise"] = slower
    headline = pairs[
        (pairs["context"] == 4096)
        & (pairs["batch"] == 4)
        & (pairs["variant"] == "head:1:1")
        & (pairs["pass"] == "prefill")
    ]
    speedups = dict(zip(headline["fa_backend"], headline["latency_ms_seq"] / headline["latency_ms_str"], strict=True))
    met = not slower.any() and bool(speedups) and min(speedups.values()) >= 1.2  # with every FA kernel measured
    summary = f"{int(slower.sum())} of {len(pairs)} pairs slower on streams beyond noise; "
    summary += (
        "4K, B=4, 16+16 heads prefill: " + ", ".join(f"{x:.2f}x ({b})" for b, x in speedups.items())
        if speedups
        else "the 4K, B=4 point is missing"
    )
    return Check("streams", evidence, "met" if met else "not met", summary)


def parts_check(rows: pd.DataFrame) -> Check:
    """Target 2: met when every sequential head-level row with its parts timed takes at most 1.05x their sum."""
    sequential = rows[(rows["mode"] == "sequential") & rows["extra"].map(lambda e: "vs_parts_sum" in e)]
    if sequential.empty:
        return Check("parts", pd.DataFrame(), "no data", "no sequential head-level row with its parts timed")
    evidence = sequential[KERNEL_KEY[1:5] + ["fa_backend"]].copy()
    evidence["latency_ms"] = sequential["latency_ms"].round(4)
    evidence["fa_alone_ms"] = sequential["extra"].map(lambda e: round(e["parts_ms"].get("fa", 0.0), 4))
    evidence["gdn_alone_ms"] = sequential["extra"].map(lambda e: round(e["parts_ms"].get("gdn", 0.0), 4))
    evidence["vs_sum"] = sequential["extra"].map(lambda e: round(e["vs_parts_sum"], 3))
    worst = float(evidence["vs_sum"].max())
    return Check("parts", evidence, "met" if worst <= 1.05 else "not met", f"worst {worst:.3f}x the sum of the parts")


def layer31_check(rows: pd.DataFrame) -> Check:
    """Target 3: met when head 7:1 is at least 1.45x faster than layer 3:1 at 64K prefill, batch 1 (ms per layer)."""
    at = rows[
        (rows["context"] == 65536) & (rows["pass"] == "prefill") & (rows["batch"] == 1) & (rows["mode"] == "sequential")
    ]
    head, layer = at[at["variant"] == "head:7:1"], at[at["variant"] == "layer:3:1"]
    if head.empty or layer.empty:
        return Check("head 7:1 vs layer 3:1", pd.DataFrame(), "no data", "64K prefill rows missing")
    speedup = float(layer["latency_ms"].iloc[0] / head["latency_ms"].iloc[0])
    evidence = pd.concat([head, layer])[["variant", "context", "latency_ms", "latency_p10_ms", "latency_p90_ms"]].round(
        4
    )
    summary = f"{speedup:.2f}x at 64K prefill (per layer)"
    return Check("head 7:1 vs layer 3:1", evidence, "met" if speedup >= 1.45 else "not met", summary)


def decode_bandwidth_check(rows: pd.DataFrame, copy_gbps: float | None) -> Check:
    """KV bytes the FA heads read over the time the FA part takes: pure-FA rows use the whole step, head-level rows
    the FA part timed alone. Where several FA backends ran a point, the fastest one answers for it."""
    decode = rows[(rows["pass"] == "decode") & rows["context"].between(32768, 131072) & (rows["mode"] == "sequential")]
    records = []
    for _, row in decode.iterrows():
        if row["variant"] == "fa":
            seconds = row["latency_ms"] * 1e-3
        elif "parts_ms" in row["extra"] and "fa" in row["extra"]["parts_ms"]:
            seconds = row["extra"]["parts_ms"]["fa"] * 1e-3
        else:
            continue
        gbps = row["kv_cache_bytes"] / seconds / 1e9
        records.append({"variant": row["variant"], "fa_backend": row["fa_backend"], "fa_heads": row["fa_heads"], "context": row["context"],
                        "batch": row["batch"], "fa_ms": round(seconds * 1e3, 4), "kv_GB/s": round(gbps), "of_copy": round(gbps / copy_gbps, 3) if copy_gbps else None})  # fmt: skip
    evidence = pd.DataFrame(records)
    if evidence.empty or not copy_gbps:
        return Check(
            "decode KV bandwidth",
            evidence,
            "no data",
            "no decode rows at 32K-128K, or no measured copy bandwidth in env.json",
        )
    point = ["variant", "context", "batch"]
    evidence["best"] = evidence["kv_GB/s"] == evidence.groupby(point)["kv_GB/s"].transform("max")
    best = evidence[evidence["best"]].drop_duplicates(point)
    below = best[best["of_copy"] < 0.85]
    several = evidence["fa_backend"].nunique() > 1  # name the backend only where it tells rows apart
    summary = f"copy {copy_gbps:.0f} GB/s; {len(best) - len(below)} of {len(best)} points at >= 85%"
    summary += " (the fastest FA backend of each)" if several else ""
    if not below.empty:
        summary += "; below: " + ", ".join(
            f"{v}{f' ({b})' if several else ''} at {c // 1024}K ({f:.0%})"
            for v, b, c, f in zip(
                below["variant"], below["fa_backend"], below["context"], below["of_copy"], strict=True
            )
        )
    return Check("decode KV bandwidth", evidence, "met" if below.empty else "not met", summary)


K = 1024
POINT = ["variant", "gdn_backend", "context", "batch"]


def _as_graphs(at: pd.DataFrame) -> str:
    """The summary's "; timed as CUDA graphs" where every row read was (decode always is; a sweep with --graph times every pass so,
    and never shares a run with eager rows of the other passes: hhbench.runner.sweep.check_timer), else "": an eager
    step's latency holds the host's time to issue it, which a graph's does not."""
    return "; timed as CUDA graphs" if (at["timer"] == "cuda-graph").all() else ""


def _at(rows: pd.DataFrame, model: str, scope: str, pass_: str, batch: int) -> pd.DataFrame:
    return rows[
        (rows["model"] == model) & (rows["scope"] == scope) & (rows["pass"] == pass_) & (rows["batch"] == batch)
    ]


@dataclass(frozen=True)
class FloorTarget:
    """Every measured row of these variants in the context range (each GDN backend) within `at_most` x its floor;
    "floor invalid" where a row's floor is above its layer's p90. Eager rows also show the host's time to issue the
    step (host_ms) and whether it was host-bound (tables.host.host_bound), and the summary says how many of the
    rows over the bound were: their latency is the host's, the verdict stands."""

    name: str
    scope: str
    pass_: str
    variants: tuple[str, ...]
    contexts: tuple[int, int]  # inclusive range
    at_most: float
    model: str = "qwen3-1.7b"
    batch: int = 1

    def check(self, rows: pd.DataFrame) -> Check:
        """This target's Check on `rows`: met when every measured row with a floor is within `at_most` x of it,
        floor invalid (whatever the ratios) when some row's floor is above the layer's p90."""
        at = _at(rows, self.model, self.scope, self.pass_, self.batch)
        at = at[at["variant"].isin(self.variants) & at["context"].between(*self.contexts) & at["floor_ms"].notna()]
        if at.empty:
            return Check(self.name, pd.DataFrame(), "no data", "no measured row with its floor at these points")
        # unrounded: the verdict counts the rows above the bound, and markdown_table shows 4 significant digits
        evidence = at[POINT + ["latency_ms", "floor_ms", "vs_floor"]].reset_index(drop=True)
        # A layer faster than its floor even at its 90th percentile means the floor timed a part slower than the
        # layer runs it (an unpadded GEMM did, on the H200): such a floor bounds nothing, so the target cannot be
        # judged on these rows (neither met nor not met).
        evidence["floor_above_layer"] = (at["latency_p90_ms"] < at["floor_ms"]).to_numpy()
        host = host_times(at)
        bound = [host_bound(h, t) for h, t in zip(host, at["latency_ms"], strict=True)]
        if any(b is not None for b in bound):  # eager rows: graph-timed ones (decode) have no host time
            evidence["host_ms"] = [h if b is not None else None for h, b in zip(host, bound, strict=True)]
            evidence["host_bound"] = pd.Series(bound, dtype=object)  # None (a blank) where the row has no host time
        worst = evidence.loc[evidence["vs_floor"].idxmax()]
        above = evidence["vs_floor"] > self.at_most
        over = int(above.sum())
        invalid = int(evidence["floor_above_layer"].sum())
        summary = (
            f"{len(evidence) - over} of {len(evidence)} rows within {self.at_most}x; worst {worst['vs_floor']:.3f}x "
            f"({worst['variant']}, {worst['gdn_backend']}, {int(worst['context']) // K}K){_as_graphs(at)}"
        )
        bound_over = sum(b is True for b, is_above in zip(bound, above, strict=True) if is_above)
        if bound_over:
            share = f"{HOST_BOUND_SHARE:.0%}"
            summary += (
                f"; {bound_over} of {over} over {self.at_most}x host-bound (step issued in >= {share} of its time)"
            )
        if invalid:
            summary = f"in {invalid} of {len(evidence)} rows the floor is above the layer's p90, no floor; " + summary
            return Check(self.name, evidence, FLOOR_INVALID, summary)
        return Check(self.name, evidence, "met" if over == 0 else "not met", summary)


@dataclass(frozen=True)
class SpeedupTarget:
    """`faster` against `than` at one point: the slower's latency over the faster's, each its fastest row there
    (its best GDN backend), at least `at_least` (or just faster, at_least = 1 exclusive)."""

    name: str
    scope: str
    pass_: str
    context: int
    at_least: float
    faster: str = "head:7:1"  # a variant label: "head:7:1+kv" is head 7:1 with --kv-aware
    than: str = "layer:3:1"
    model: str = "qwen3-1.7b"
    batch: int = 1

    def check(self, rows: pd.DataFrame) -> Check:
        """This target's Check on `rows`: the slower variant's best latency over the faster's, at this point."""
        at = _at(rows, self.model, self.scope, self.pass_, self.batch)
        at = at[at["context"] == self.context]
        fast = at[at["variant"] == self.faster]
        slow = at[at["variant"] == self.than]
        if fast.empty or slow.empty:
            return Check(self.name, pd.DataFrame(), "no data", f"{self.faster} or {self.than} missing at this point")
        best_fast, best_slow = fast.loc[fast["latency_ms"].idxmin()], slow.loc[slow["latency_ms"].idxmin()]
        speedup = float(best_slow["latency_ms"] / best_fast["latency_ms"])
        both = pd.concat([fast, slow])
        evidence = both[POINT + ["latency_ms", "latency_p10_ms", "latency_p90_ms"]]
        met = speedup >= self.at_least if self.at_least > 1 else speedup > 1
        summary = (
            f"{speedup:.2f}x ({best_fast['latency_ms']:.4g} ms with {best_fast['gdn_backend']} vs "
            f"{best_slow['latency_ms']:.4g} ms with {best_slow['gdn_backend']}){_as_graphs(both)}"
        )
        return Check(self.name, evidence.reset_index(drop=True), "met" if met else "not met", summary)


@dataclass(frozen=True)
class BackendsTarget:
    """Both GDN backends measured, side by side, at every point of these variants, passes and contexts that has
    either; the summary gives the second's speed-up over the first."""

    name: str
    scope: str
    passes: tuple[str, ...]
    contexts: tuple[int, int]
    backends: tuple[str, str] = ("fla-chunk", "flash-qla")
    model: str = "qwen3-1.7b"
    batch: int = 1

    def check(self, rows: pd.DataFrame) -> Check:
        """This target's Check on `rows`: met when every point with either GDN backend has both, no data when only
        one of the two is measured at these points (nothing compared)."""
        at = rows[(rows["model"] == self.model) & (rows["scope"] == self.scope) & (rows["batch"] == self.batch)]
        at = at[at["pass"].isin(self.passes) & at["context"].between(*self.contexts)]
        at = at[at["gdn_backend"].isin(self.backends)]
        if at.empty:
            return Check(self.name, pd.DataFrame(), "no data", f"no row with {' or '.join(self.backends)}")
        first, second = self.backends
        measured = set(at["gdn_backend"])
        if len(measured) == 1:  # one backend only (a FlashQLA-only run): nothing compared, so nothing to judge
            (present,) = measured
            absent = second if present == first else first
            return Check(self.name, pd.DataFrame(), "no data", f"no row with {absent}, only with {present}")
        wide = at.pivot_table(
            index=["variant", "pass", "context"], columns="gdn_backend", values="latency_ms", aggfunc="min"
        ).reindex(columns=list(self.backends))
        evidence = wide.reset_index().rename(columns={first: f"{first}_ms", second: f"{second}_ms"})
        evidence[f"{second}_speedup"] = (wide[first] / wide[second]).to_numpy()
        missing = int(wide.isna().any(axis=1).sum())
        ratios = evidence[f"{second}_speedup"].dropna()
        summary = f"{len(wide) - missing} of {len(wide)} points with both"
        if not ratios.empty:
            summary += f"; {second} {ratios.min():.2f}x-{ratios.max():.2f}x {first}"
        return Check(self.name, evidence, "met" if missing == 0 else "not met", summary)


LAYER_TARGETS = (
    FloorTarget("layer prefill within 1.15x of its floor", "layer", "prefill",
                ("head:7:1", "head:3:1", "layer:3:1"), (16 * K, 128 * K), 1.15),
    SpeedupTarget("head 7:1 vs layer 3:1, layer prefill 64K", "layer", "prefill", 64 * K, 1.3),
    SpeedupTarget("head 7:1 vs layer 3:1, layer prefill 128K", "layer", "prefill", 128 * K, 1.45),
    SpeedupTarget("head 7:1 vs layer 3:1, model prefill 128K", "model", "prefill", 128 * K, 1.25),
    SpeedupTarget("head 7:1 vs layer 3:1, layer train 64K", "layer", "train", 64 * K, 1.3),
    FloorTarget("layer decode within 1.3x of its floor", "layer", "decode",
                ("head:7:1", "head:3:1", "layer:3:1"), (16 * K, 128 * K), 1.3),
    SpeedupTarget("head 7:1 kv-aware faster than layer 3:1, decode B=16 64K", "layer", "decode", 64 * K, 1.0,
                  faster="head:7:1+kv", batch=16),
    BackendsTarget("FlashQLA and fla-chunk side by side", "layer", ("prefill", "train"), (16 * K, 128 * K)),
)  # fmt: skip


def check_targets(run: Run) -> Targets:
    """The kernel targets where the run has kernel rows, issue 12's where it has layer or model rows."""
    frame = run.frame()
    targets = Targets(run.label)
    if frame.empty:
        return targets
    measured = frame[frame["status"] == OK]
    rows = measured[measured["scope"] == "kernel"]
    if not rows.empty:
        copy_gbps = (run.env.get("peaks") or {}).get("copy_gbps")
        targets.checks += [
            streams_check(rows),
            parts_check(rows),
            layer31_check(rows),
            decode_bandwidth_check(rows, copy_gbps),
        ]
    wider = measured[measured["scope"] != "kernel"]
    if not wider.empty:
        targets.checks += [target.check(wider) for target in LAYER_TARGETS]
    return targets
