"""The performance targets of the kernels issue, checked on a run's rows (kernel scope, measured):

1. streams: the head-level core on two CUDA streams is never slower than sequential (beyond the rows' noise),
   and at least 1.2x faster at 4K, batch 4, 16 FA + 16 GDN heads;
2. parts: the head-level kernel scope takes at most 5% more than its FA and GDN parts timed alone;
3. head 7:1 against layer 3:1 (per layer) at 64K prefill: at least 1.45x faster;
4. decode at 32K-128K: the FA heads read their KV cache at >= 85% of the card's measured copy bandwidth.
Each check lists the rows it read, so a reader can find them in the run.
"""

from dataclasses import dataclass, field

import pandas as pd

from hhbench.rows.schema import OK, markdown_table
from hhbench.rows.sources import Run

KERNEL_KEY = ["model", "variant", "context", "batch", "pass", "dtype", "fa_backend", "gdn_backend"]


@dataclass
class Check:
    target: str
    evidence: pd.DataFrame
    verdict: str  # met | not met | no data
    summary: str


@dataclass
class Targets:
    run: str
    checks: list[Check] = field(default_factory=list)

    def to_markdown(self) -> str:
        blocks = [f"## Performance targets: {self.run}\n"]
        blocks.append(
            markdown_table(
                pd.DataFrame([{"target": c.target, "verdict": c.verdict, "summary": c.summary} for c in self.checks])
            )
        )
        for check in self.checks:
            if not check.evidence.empty:
                blocks.append(f"\n### {check.target}\n\n{markdown_table(check.evidence)}")
        return "\n".join(blocks) + "\n"


def _kernel_rows(run: Run) -> pd.DataFrame:
    frame = run.frame()
    if frame.empty:
        return frame
    return frame[(frame["status"] == OK) & (frame["scope"] == "kernel")]


def streams_check(rows: pd.DataFrame) -> Check:
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


def check_targets(run: Run) -> Targets:
    rows = _kernel_rows(run)
    copy_gbps = (run.env.get("peaks") or {}).get("copy_gbps")
    targets = Targets(run.label)
    if rows.empty:
        return targets
    targets.checks = [
        streams_check(rows),
        parts_check(rows),
        layer31_check(rows),
        decode_bandwidth_check(rows, copy_gbps),
    ]
    return targets
