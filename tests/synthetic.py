"""Runs for the table, report and gate tests: analytic rows of the cost model, and 'measured' rows made from them
with a latency model whose answers the tests know (a fixed per-call overhead that head-level layouts pay more
of, plus FLOPs at a fixed rate), so crossovers and regressions land where the tests expect them."""

import json
from dataclasses import replace
from pathlib import Path

from hhbench.analytic.rows import analytic_rows
from hhbench.rows.schema import OK, EvalRow, Row, RowSet
from hhbench.spec.axes import Pass, Scope
from hhbench.spec.parse import hybrid_specs
from hhbench.spec.shapes import resolve_shape

CONTEXTS = [256, 1024, 4096, 16384]
RATE_FLOPS_PER_MS = 1e9
OVERHEAD_MS = {"layer": 0.05, "head": 0.15, "fa": 0.05, "la": 0.05}
SPREAD = 0.02  # p10 and p90 at -2% and +2% of the median


def analytic(
    model: str = "tiny",
    contexts: list[int] = CONTEXTS,
    passes=(Pass.PREFILL, Pass.DECODE),
    scopes=(Scope.MODEL,),
    ratios: str = "1:1,3:1,7:1",
) -> RowSet:
    specs = hybrid_specs("fa,la,layer,head", ratios)
    rows = RowSet()
    for scope in scopes:
        rows += analytic_rows(resolve_shape(model), specs, contexts, list(passes), 1, scope, "fp32")
    return rows


def latency_ms(row: Row) -> float:
    return OVERHEAD_MS[row.layout] + row.flops_total / RATE_FLOPS_PER_MS


def measured(rows: RowSet, device: str = "cpu (test)", backends=("sdpa", "reference")) -> RowSet:
    """Layer and model rows also get a floor: their FLOPs at the rate, without the per-call overhead."""
    out = RowSet()
    for row in rows:
        median = latency_ms(row)
        floor = row.flops_total / RATE_FLOPS_PER_MS if row.scope != "kernel" else None
        samples = [median * (1 + SPREAD * step / 10) for step in range(-10, 11)]  # 21, from p0 to p100
        out.append(
            replace(
                row,
                fa_backend=backends[0] if row.fa_heads else "",
                gdn_backend=backends[1] if row.la_heads else "",
                status=OK,
                device=device,
                timer="perf_counter",
                latency_ms=median,
                latency_p10_ms=median * (1 - SPREAD),
                latency_p90_ms=median * (1 + SPREAD),
                samples_ms=samples,
                reps=len(samples),
                peak_mem_bytes=row.kv_cache_bytes + row.state_bytes + row.weight_bytes,
                tflops=row.flops_total / median / 1e9,
                gbps=row.bytes_moved / median / 1e6,
                floor_ms=floor,
                vs_floor=median / floor if floor else None,
            )
        )
    return out


def quality(variants=("teacher", "layer:3:1", "head:7:1"), tasks=("passkey", "niah_single")) -> RowSet:
    """Scores that fall with context, faster for the cheaper variants."""
    rows = RowSet()
    for rank, variant in enumerate(variants):
        for task in tasks:
            for context in CONTEXTS:
                value = max(0.0, 1.0 - 0.02 * (rank + 1) * CONTEXTS.index(context))
                rows.append(EvalRow("tiny", variant, task, context, "exact_match", value, 0.02, 100))
    return rows


def write_run(folder: Path, rows: RowSet, env: dict | None = None, eval_rows: RowSet | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows.to_jsonl(folder / "rows.jsonl")
    if env is not None:
        (folder / "env.json").write_text(json.dumps(env))
    if eval_rows:
        eval_rows.to_jsonl(folder / "eval.jsonl")
    return folder
