"""`hhbench table --targets`: the kernels' performance targets computed from rows whose answers are known."""

from dataclasses import replace
from pathlib import Path

from hhbench.rows.schema import ANALYTIC, ERROR, OK, Row, RowSet
from hhbench.rows.sources import Run
from hhbench.tables.targets import check_targets


def row(variant, context, pass_="prefill", latency=1.0, spread=0.01, mode="sequential", batch=1, **extra_fields):
    extra = extra_fields.pop("extra", {})
    return Row(model="h32d128", layout=variant.split(":")[0], ratio="", context=context, batch=batch, pass_=pass_,
               scope="kernel", variant=variant, mode=mode, status=OK, latency_ms=latency,
               latency_p10_ms=latency * (1 - spread), latency_p90_ms=latency * (1 + spread), extra=extra,
               **extra_fields)  # fmt: skip


def run_of(rows, copy_gbps=3000.0):
    return Run("gpu", Path("gpu"), RowSet(rows), env={"peaks": {"copy_gbps": copy_gbps}})


def passing_rows():
    kv = 2.7e12 * 0.2e-3  # bytes read at 2.7 TB/s in 0.2 ms: 90% of a 3 TB/s copy
    return [
        row("head:1:1", 4096, batch=4, latency=1.5),
        row("head:1:1", 4096, batch=4, latency=1.2, mode="streams"),
        row("head:7:1", 65536, latency=13.0, extra={"parts_ms": {"fa": 7.5, "gdn": 5.5}, "vs_parts_sum": 1.0}),
        row("layer:3:1", 65536, latency=19.6),
        row("fa", 32768, "decode", latency=0.2, kv_cache_bytes=kv),
        row(
            "head:7:1",
            32768,
            "decode",
            latency=0.06,
            kv_cache_bytes=kv / 8,
            extra={"parts_ms": {"fa": 0.025, "gdn": 0.008}, "vs_parts_sum": 0.9},
        ),  # fmt: skip
    ]


def test_all_targets_met():
    targets = {c.target: c for c in check_targets(run_of(passing_rows())).checks}
    assert [c.verdict for c in targets.values()] == ["met"] * 4
    assert "1.25x" in targets["streams"].summary
    assert targets["head 7:1 vs layer 3:1"].summary == "1.51x at 64K prefill (per layer)"
    assert targets["decode KV bandwidth"].summary == "copy 3000 GB/s; 2 of 2 points at >= 85%"


def test_each_target_can_fail():
    rows = passing_rows()
    rows[1].latency_ms = rows[1].latency_p10_ms = rows[1].latency_p90_ms = 1.6  # streams slower, beyond noise
    rows[2].extra["vs_parts_sum"] = 1.08
    rows[2].latency_ms = 14.0  # 1.40x only
    rows[5].extra["parts_ms"]["fa"] = 0.05  # half the bandwidth
    targets = check_targets(run_of(rows))
    assert [c.verdict for c in targets.checks] == ["not met"] * 4
    assert "1 of 1 pairs slower on streams beyond noise" in targets.checks[0].summary
    assert "head:7:1 at 32K (45%)" in targets.checks[3].summary
    markdown = targets.to_markdown()
    assert "## Performance targets: gpu" in markdown and "### parts" in markdown


def test_several_fa_backends_each_point_answered_by_its_fastest_and_streams_by_every_one():
    rows = passing_rows()
    for r in rows:
        r.fa_backend = "triton-split" if r.pass_ == "decode" else "sdpa-flash"
    slow_decode = row("head:7:1", 32768, "decode", latency=0.09, kv_cache_bytes=rows[5].kv_cache_bytes,
                      fa_backend="sdpa-flash", extra={"parts_ms": {"fa": 0.05, "gdn": 0.008}, "vs_parts_sum": 0.9})  # fmt: skip
    busy = [
        row("head:1:1", 4096, batch=4, latency=1.0, fa_backend="sdpa-cudnn", mode=m) for m in ("sequential", "streams")
    ]
    targets = {c.target: c for c in check_targets(run_of([*rows, slow_decode, *busy])).checks}
    decode = targets["decode KV bandwidth"]
    assert decode.verdict == "met" and len(decode.evidence) == 3
    assert decode.summary == "copy 3000 GB/s; 2 of 2 points at >= 85% (the fastest FA backend of each)"
    assert decode.evidence["best"].tolist() == [True, True, False]
    streams = targets["streams"]
    assert streams.verdict == "not met"  # 1.25x with sdpa-flash, 1.00x with sdpa-cudnn
    assert streams.summary.endswith("prefill: 1.25x (sdpa-flash), 1.00x (sdpa-cudnn)")


def test_missing_points_say_no_data():
    targets = check_targets(run_of([row("fa", 4096)], copy_gbps=None))
    assert [c.verdict for c in targets.checks] == ["no data"] * 4


def test_a_run_without_measured_rows_says_so():
    """Analytic rows, failed rows or none (a quality run): a sentence, where an empty table ('|  |', '||') stood."""
    failed = replace(row("fa", 4096), status=ERROR, latency_ms=None, reason="boom")
    for rows in ([replace(row("fa", 4096), status=ANALYTIC, latency_ms=None)], [failed], []):
        text = check_targets(run_of(rows)).to_markdown()
        assert text == "## Performance targets: gpu\n\nno measured (ok) performance rows: no target to check\n", text


def test_committed_gpu_run(cli):
    result = cli("table", "results/gpu-default-h100", "--targets")
    assert result.returncode == 0, result.stderr
    assert "| head 7:1 vs layer 3:1 | met | 1.51x at 64K prefill (per layer) |" in result.stdout
    after = cli("table", "results/gpu-targets-h100", "--targets")
    assert after.returncode == 0, after.stderr
    assert "| head 7:1 vs layer 3:1 | met | 1.55x at 64K prefill (per layer) |" in after.stdout
    assert "6 of 9 points at >= 85% (the fastest FA backend of each)" in after.stdout


def test_targets_take_no_csv_or_json(cli, tmp_path):
    """--targets prints the verdicts instead of the comparison: asked with --csv or --json it wrote neither file and
    exited 0; one line and exit 2 instead, as --kernels."""
    for flag in ("--csv", "--json"):
        out = tmp_path / f"t.{flag[2:]}"
        result = cli("table", "results/gpu-default-h100", "--targets", flag, str(out))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "--targets is a view of its own" in result.stderr and not out.exists()


def layer_row(variant, context, pass_="prefill", latency=1.0, floor=0.9, gdn="flash-qla", scope="layer", batch=1,
              timer=None, host=None):  # fmt: skip
    timer = timer or ("cuda-graph" if pass_ == "decode" else "cuda-events")  # as a sweep without --graph times them
    return Row(model="qwen3-1.7b", layout=variant.split(":")[0], ratio="", context=context, batch=batch, pass_=pass_,
               scope=scope, variant=variant, mode="sequential", status=OK, latency_ms=latency, gdn_backend=gdn,
               latency_p10_ms=latency * 0.99, latency_p90_ms=latency * 1.01, floor_ms=floor,
               vs_floor=latency / floor if floor else None, timer=timer,
               extra={} if host is None else {"host_ms": host})  # fmt: skip


def unknown_host(row, value):
    """`row` with extra.host_ms = value as a row file edited by hand may hold it (null, NaN, text)."""
    row.extra = {"host_ms": value}
    return row


def passing_layer_rows():
    """Head 7:1 1.35x at 64K and 1.5x at 128K prefill (its best backend), 1.3x model, 1.31x train, decode within
    1.3x of its floor, kv-aware decode faster at B=16, both GDN backends at every prefill and train point."""
    K = 1024
    rows = []
    for gdn, slow in (("flash-qla", 1.0), ("fla-chunk", 2.0)):
        for context, head, layer in ((16 * K, 1.0, 1.0), (64 * K, 10.0, 13.5), (128 * K, 20.0, 30.0)):
            rows += [layer_row("head:7:1", context, latency=head * slow, floor=head * slow / 1.1, gdn=gdn),
                     layer_row("layer:3:1", context, latency=layer * slow, floor=layer * slow / 1.1, gdn=gdn),
                     layer_row("head:7:1", context, "train", latency=3 * head * slow, floor=None, gdn=gdn),
                     layer_row("layer:3:1", context, "train", latency=3.93 * layer * slow, floor=None, gdn=gdn)]  # fmt: skip
    rows += [
        layer_row("head:7:1", 128 * K, latency=1000.0, floor=900.0, scope="model"),
        layer_row("layer:3:1", 128 * K, latency=1300.0, floor=1000.0, scope="model"),
        layer_row("head:7:1", 64 * K, "decode", latency=0.12, floor=0.1, gdn="fla-recurrent"),
        layer_row("head:7:1+kv", 64 * K, "decode", latency=0.5, floor=0.45, gdn="fla-recurrent", batch=16),
        layer_row("layer:3:1", 64 * K, "decode", latency=0.6, floor=0.5, gdn="fla-recurrent", batch=16),
    ]
    return rows


def layer_targets(rows):
    return {c.target: c for c in check_targets(run_of(rows)).checks}


def test_layer_targets_met():
    targets = layer_targets(passing_layer_rows())
    assert len(targets) == 8 and {c.verdict for c in targets.values()} == {"met"}, {
        name: c.summary for name, c in targets.items() if c.verdict != "met"}  # fmt: skip
    assert targets["head 7:1 vs layer 3:1, layer prefill 64K"].summary == (
        "1.35x (10 ms with flash-qla vs 13.5 ms with flash-qla)"
    )
    assert targets["layer prefill within 1.15x of its floor"].summary.startswith(
        "12 of 12 rows within 1.15x; worst 1.100x"
    )
    assert targets["FlashQLA and fla-chunk side by side"].summary == (
        "12 of 12 points with both; flash-qla 2.00x-2.00x fla-chunk"
    )


def test_each_layer_target_can_fail():
    rows = passing_layer_rows()
    K = 1024
    slow_floor = layer_row("head:3:1", 64 * K, latency=2.0, floor=1.0)  # 2x its floor
    rows = [r for r in rows if not (r.variant == "head:7:1" and r.context == 128 * K and r.gdn_backend == "fla-chunk")]
    for r in rows:
        if r.variant == "layer:3:1" and r.context == 64 * K and r.gdn_backend == "flash-qla":
            r.latency_ms = 11.0  # 1.1x only, at prefill and train alike
        if r.variant == "head:7:1" and r.context == 128 * K and r.pass_ == "prefill" and r.scope == "layer":
            r.latency_ms = 22.0  # 1.36x
        if r.scope == "model" and r.variant == "layer:3:1":
            r.latency_ms = 1100.0
        if r.pass_ == "decode" and r.batch == 1:
            r.floor_ms, r.vs_floor = 0.05, 2.4
        if r.variant == "head:7:1+kv":
            r.latency_ms = 0.7
    targets = layer_targets([*rows, slow_floor])
    assert {name: c.verdict for name, c in targets.items()} == {name: "not met" for name in targets}, {
        n: c.summary for n, c in targets.items()
    }
    assert "(head:3:1, flash-qla, 64K)" in targets["layer prefill within 1.15x of its floor"].summary
    assert targets["FlashQLA and fla-chunk side by side"].summary.startswith("10 of 13 points with both")


def test_a_floor_target_judges_and_shows_the_unrounded_ratio():
    """The evidence was rounded to 4 decimals before the verdict counted rows above the bound, so a row at 1.30004x
    its floor passed 1.3x, and before the table's 4 significant digits, so 1.19251 read 1.192 (floor-h200-v5)."""
    rows = [r for r in passing_layer_rows() if not (r.pass_ == "decode" and r.batch == 1)]
    rows.append(layer_row("head:7:1", 64 * 1024, "decode", latency=0.130004, floor=0.1, gdn="fla-recurrent"))
    rows.append(layer_row("head:3:1", 64 * 1024, "decode", latency=0.119251, floor=0.1, gdn="fla-recurrent"))
    checks = check_targets(run_of(rows))
    decode = next(c for c in checks.checks if c.target == "layer decode within 1.3x of its floor")
    assert decode.verdict == "not met" and decode.summary.startswith("1 of 2 rows within 1.3x"), decode.summary
    markdown = checks.to_markdown()
    assert "| head:3:1 | fla-recurrent | 65536 | 1 | 0.1193 | 0.1 | 1.193 | False |" in markdown, markdown


def test_a_floor_target_says_which_rows_over_it_were_host_bound():
    """floor-h200-v10's one row over 1.15x was issued by the host in 1.77 ms for a 1.86 ms step: the verdict stands,
    the summary and the evidence say the step was the host's. A row issued in 89% of its time is not host-bound, and
    graph-timed rows (decode: no host time) get no host columns."""
    name = "layer prefill within 1.15x of its floor"
    K = 1024
    rows = [r for r in passing_layer_rows() if not (r.pass_ == "prefill" and r.context == 16 * K)]
    rows += [
        layer_row("head:7:1", 16 * K, latency=1.858, floor=1.43, host=1.775),  # over, host-bound
        layer_row("head:3:1", 16 * K, latency=1.8, floor=1.5, host=0.89 * 1.8),  # over, host at 89%: not bound
        layer_row("layer:3:1", 16 * K, latency=1.0, floor=0.95, host=0.99),  # host-bound, within the bound
    ]
    targets = layer_targets(rows)
    check = targets[name]
    assert check.verdict == "not met"
    assert check.summary.endswith("; 1 of 2 over 1.15x host-bound (step issued in >= 90% of its time)"), check.summary
    bound = check.evidence.set_index("variant").loc[lambda e: e["context"] == 16 * K, "host_bound"]
    assert bound.to_dict() == {"head:7:1": True, "head:3:1": False, "layer:3:1": True}
    assert check.evidence["host_ms"].isna().sum() == len(check.evidence) - 3  # rows without a host time: empty
    assert "host" not in targets["layer decode within 1.3x of its floor"].summary
    assert "host_ms" not in targets["layer decode within 1.3x of its floor"].evidence
    unbound = layer_targets([r for r in rows if r.variant != "head:7:1" or r.context != 16 * K])[name]
    assert "host-bound" not in unbound.summary, "no row over the bound was host-bound"


def test_a_row_without_a_measured_host_time_is_neither_host_bound_nor_not():
    """host_ms null, NaN or text (a row file edited by hand) is no host time: host_bound empty, not False, and no
    error; the summary counts only the rows known to be host-bound."""
    name = "layer prefill within 1.15x of its floor"
    K = 1024
    rows = [r for r in passing_layer_rows() if not (r.pass_ == "prefill" and r.context == 16 * K)]
    rows += [
        layer_row("head:7:1", 16 * K, latency=1.858, floor=1.43, host=1.775),
        unknown_host(layer_row("head:3:1", 16 * K, latency=1.8, floor=1.5), None),
        unknown_host(layer_row("layer:3:1", 16 * K, latency=1.8, floor=1.5), float("nan")),
        unknown_host(layer_row("head:7:1", 16 * K, latency=1.8, floor=1.5, gdn="fla-chunk"), "1.77"),
    ]
    check = layer_targets(rows)[name]
    at_16k = check.evidence[check.evidence["context"] == 16 * K]
    assert at_16k["host_bound"].isna().sum() == 3 and at_16k["host_bound"].tolist().count(True) == 1
    assert at_16k["host_ms"].isna().sum() == 3
    assert check.summary.endswith("; 1 of 4 over 1.15x host-bound (step issued in >= 90% of its time)"), check.summary


def test_layer_targets_without_their_points_say_no_data():
    targets = layer_targets([layer_row("fa", 4096)])
    assert [c.verdict for c in targets.values()] == ["no data"] * 8


def test_backends_side_by_side_with_one_backend_measured_says_no_data():
    """A FlashQLA-only run compared nothing: "no data" naming the backend missing, not "not met" with "0 of 12
    points with both"; a run with both, where some points lack one, stays "not met" (test above)."""
    name = "FlashQLA and fla-chunk side by side"
    for present, missing in (("flash-qla", "fla-chunk"), ("fla-chunk", "flash-qla")):
        check = layer_targets([r for r in passing_layer_rows() if r.gdn_backend != missing])[name]
        assert (check.verdict, check.summary) == ("no data", f"no row with {missing}, only with {present}")
        assert check.evidence.empty


def test_a_floor_above_the_layer_is_no_floor():
    """The H200 run whose floor timed an unpadded GEMM: the layer at 0.90x its floor, beyond its spread."""
    checked = check_targets(run_of([*passing_layer_rows(), layer_row("head:3:1", 64 * 1024, latency=9.0, floor=10.0)]))
    check = {c.target: c for c in checked.checks}["layer prefill within 1.15x of its floor"]
    assert check.verdict == "floor invalid", "not 'not met': every ratio is within the target"
    assert check.summary.startswith("in 1 of 13 rows the floor is above the layer's p90, no floor; 13 of 13 rows")
    assert "| layer prefill within 1.15x of its floor | floor invalid | in 1 of 13 rows" in checked.to_markdown()
    assert check.evidence["floor_above_layer"].sum() == 1


def test_a_target_read_on_cuda_graph_rows_says_so():
    """Decode is timed as CUDA graphs, eager prefill is not (its latency holds the host's time to issue a step); a
    run swept with --graph times prefill as graphs too, and its prefill targets say so."""
    eager = layer_targets(passing_layer_rows())
    assert eager["layer decode within 1.3x of its floor"].summary.endswith("; timed as CUDA graphs")
    assert "CUDA graphs" not in eager["layer prefill within 1.15x of its floor"].summary
    assert "CUDA graphs" not in eager["head 7:1 vs layer 3:1, layer prefill 64K"].summary
    graphs = layer_targets([layer_row(r.variant, r.context, r.pass_, r.latency_ms, r.floor_ms, r.gdn_backend, r.scope,
                                      r.batch, timer="cuda-graph") for r in passing_layer_rows()])  # fmt: skip
    assert graphs["layer prefill within 1.15x of its floor"].summary.endswith("; timed as CUDA graphs")
    assert graphs["head 7:1 vs layer 3:1, layer prefill 64K"].summary.endswith("; timed as CUDA graphs")
