"""`hhbench report`: the page opens offline in a real headless Chromium, every figure renders, nothing errs."""

import os
import re
import struct
from pathlib import Path

import pandas as pd
import pytest
from browser import Browser, distinct_colours, find_chromium
from inprocess import run_main
from synthetic import analytic, measured, quality, write_run

from hhbench.report.figures import quality_figure, roofs
from hhbench.report.labels import series_labels
from hhbench.report.page import Report, build_report
from hhbench.rows.schema import RowSet
from hhbench.rows.sources import describe, load_runs
from hhbench.spec.axes import Pass, Scope

H100_ENV = {
    "device": "NVIDIA H100 80GB HBM3",
    "gpu": {"name": "NVIDIA H100 80GB HBM3", "sm_count": 132, "capability": "9.0"},
    "versions": {"torch": "2.13.0", "fla-core": "0.6.0", "triton": "3.5.0"},
    "hhbench_commit": "0123abc",
    "time": "2025-11-27T10:00:00+00:00",
}
RESULTS = Path(__file__).parent.parent / "results"
CPU_ENV = {"device": "cpu (x86_64, 2 threads)", "peaks": {"bf16_matmul_tflops": 0.5, "copy_gbps": 10.0}}
FIGURES = ["latency", "floor", "speedup", "flops-tiny-prefill", "flops-tiny-train", "flops-tiny-decode", "memory-tiny",
           "roofline", "decode", "quality"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("runs")
    rows = analytic(contexts=[256, 4096], passes=list(Pass), scopes=(Scope.KERNEL, Scope.MODEL), ratios="3:1,7:1")
    return [
        write_run(folder / "h100", measured(rows, backends=("flash", "fla")), env=H100_ENV),
        write_run(folder / "cpu", measured(rows), env=CPU_ENV, eval_rows=quality()),
        write_run(folder / "flops", rows),
        write_run(folder / "prefill", analytic(contexts=[256, 4096], passes=[Pass.PREFILL])),
    ]


@pytest.fixture(scope="module")
def report(runs):
    return build_report(load_runs(runs[:3]))


def chromium_or_skip() -> str:
    found = find_chromium()
    if found is None:
        message = "chromium is missing: install it with `bash scripts/setup.sh --test` (Debian's chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_page_renders_offline_in_headless_chromium(cli, runs, tmp_path):
    chromium = chromium_or_skip()
    page = tmp_path / "report.html"
    result = cli("report", *map(str, runs[:3]), "--out", str(page))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{page}: {len(FIGURES)} figures"]
    text = page.read_text()
    assert re.findall(r'<div id="([\w-]+)" class="plotly-graph-div"', text) == FIGURES
    assert not re.search(r"<script[^>]+src=", text), "every script is inline"

    with Browser(chromium, tmp_path / "profile") as browser:
        browser.open(page.as_uri())
        rendered = "[...document.querySelectorAll('.js-plotly-plot')].filter(p => p.querySelector('.main-svg'))"
        browser.wait_for(lambda: browser.evaluate(f"{rendered}.length") == len(FIGURES))
        assert browser.evaluate(f"{rendered}.map(p => p.id)") == FIGURES
        # every plot drew its data: traces in the SVG, not only axes
        assert browser.evaluate(f"{rendered}.every(p => p.querySelectorAll('.trace, .hm, image').length > 0)")
        boxes = browser.evaluate(
            f"{rendered}.map(p => {{ const r = p.getBoundingClientRect();"
            " return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; })"
        )
        for slug, box in zip(FIGURES, boxes, strict=True):
            shot = browser.screenshot({**box, "scale": 0.12})
            assert distinct_colours(shot) > 8, f"figure {slug} looks blank"
        assert distinct_colours(browser.screenshot({"x": 0, "y": 0, "width": 1400, "height": 1000, "scale": 0.12})) > 8
        # every legend entry inside the legend's box: none clipped behind a scroll bar
        clipped = browser.evaluate(
            f"{rendered}.filter(p => {{ const box = p.querySelector('.legend .bg');"
            " if (!box) return false; const bottom = box.getBoundingClientRect().bottom + 1;"
            " return [...p.querySelectorAll('.legend .traces')].some(t => t.getBoundingClientRect().bottom > bottom);"
            " }).map(p => p.id)"
        )
        assert clipped == []
        # a point's hover label shows (plotly draws none that is taller than its figure)
        unlabelled = browser.evaluate(
            f"{rendered}.filter(p => {{ const t = p._fullData.findIndex(d => d.customdata && d.type !== 'heatmap');"
            " if (t < 0) return false; const d = p._fullData[t];"
            " Plotly.Fx.hover(p, [{curveNumber: t, pointNumber: 0}], d.xaxis + d.yaxis);"
            " return !p.querySelector('.hoverlayer .hovertext'); }).map(p => p.id)"
        )
        assert unlabelled == []
        assert browser.errors() == []
        assert browser.remote_requests() == []


def test_png_images(runs, tmp_path):
    chromium = chromium_or_skip()
    page, pngs = tmp_path / "report.html", tmp_path / "png"
    result = run_main("report", str(runs[3]), "--out", str(page), "--png", str(pngs), env={"BROWSER_PATH": chromium})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{page}: 3 figures, 5 not drawn", f"{pngs}: 3 PNGs"]
    for slug in ("speedup", "flops-tiny-prefill", "memory-tiny"):
        width, height = png_size(pngs / f"{slug}.png")
        assert width == 1400 and height > 200, slug


def test_png_without_chromium_says_so_and_still_writes_the_page(runs, tmp_path):
    page = tmp_path / "report.html"
    result = run_main("report", str(runs[3]), "--out", str(page), "--png", str(tmp_path / "png"),
                 env={"BROWSER_PATH": str(tmp_path / "no-chromium")})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("hhbench: no PNGs written (")
    assert len(re.findall('class="plotly-graph-div"', page.read_text())) == 3
    assert not (tmp_path / "png" / "speedup.png").exists()


def test_png_folder_that_is_a_file_is_bad_input(runs, tmp_path):
    blocker = tmp_path / "png"
    blocker.write_text("")
    result = run_main("report", str(runs[3]), "--out", str(tmp_path / "report.html"), "--png", str(blocker))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "is a file, not a folder" in result.stderr, result.stderr


def test_a_run_with_one_configuration_twice_is_bad_input(runs, tmp_path):
    rows = load_runs([runs[3]])[0].rows
    twice = write_run(tmp_path / "twice", RowSet([*rows, rows[0]]))  # runs concatenated by hand
    result = run_main("report", str(twice), "--out", str(tmp_path / "report.html"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{twice} has two rows for one configuration: {describe(rows[0])}" in result.stderr
    assert not (tmp_path / "report.html").exists()


def test_analytic_only_report(runs):
    report = build_report(load_runs([runs[2]]))
    assert [f.slug for f in report.figures] == ["speedup", "flops-tiny-prefill", "flops-tiny-train",
                                                "flops-tiny-decode", "memory-tiny"]  # fmt: skip
    assert [o.title for o in report.omitted] == ["Latency against context", "Latency against its floor", "Roofline",
                                                 "Decode latency against context", "Quality: score against context"]  # fmt: skip
    titles = [a.text for a in report.figures[0].figure.layout.annotations]
    assert titles and all(t.endswith("(by analytic FLOPs)") for t in titles)
    train = report.crossovers[(report.crossovers["variant"] == "head:7:1") & (report.crossovers["pass"] == "train")]
    assert train.to_dict("records") == [
        {"model": "tiny", "scope": "kernel", "pass": "train", "variant": "head:7:1", "from (FLOPs)": "4k",
         "longest context": "4k"},
        {"model": "tiny", "scope": "model", "pass": "train", "variant": "head:7:1", "from (FLOPs)": "4k",
         "longest context": "4k"},
    ]  # fmt: skip


def hover_of(trace, point: int) -> str:
    """The hover text plotly shows for a point: the trace's hovertemplate filled with the point's customdata."""
    fields = trace.customdata[point]
    return re.sub(r"%\{customdata\[(\d+)\]\}", lambda m: str(fields[int(m[1])]), trace.hovertemplate)


def test_hover_carries_every_field_and_header_every_environment(report):
    latency = report.figures[0].figure
    hover = hover_of(latency.data[0], 0)
    for field in ("model", "variant", "pass", "scope", "context", "fa_backend", "flops_total", "kv_cache_bytes",
                  "latency_ms", "latency_p10_ms", "latency_p90_ms", "samples_ms", "reps", "peak_mem_bytes", "tflops",
                  "device", "timer", "status", "run", "speedup", "flops_ratio"):  # fmt: skip
        assert f"<b>{field}</b>: " in hover, field
    page = report.to_html()
    for text in ("NVIDIA H100 80GB HBM3", "name NVIDIA H100 80GB HBM3, sm_count 132", "fla-core 0.6.0", "0123abc",
                 "cpu (x86_64, 2 threads)", "bf16_matmul_tflops 0.5", "flops", "not recorded"):  # fmt: skip
        assert text in page, text


def test_floor_figure_draws_latency_and_floor_of_the_points_that_have_one(report):
    floor = next(f for f in report.figures if f.slug == "floor").figure
    dashes = {trace.line.dash for trace in floor.data}
    assert dashes == {"solid", "dot"}
    assert {a.text for a in floor.layout.annotations} >= {"scope=model"}  # kernel rows have no floor
    assert not any(a.text == "scope=kernel" for a in floor.layout.annotations)


def test_floor_figure_says_how_its_floors_were_timed():
    """A floor is its parts' medians summed, or on CUDA-graph rows (decode) every part back to back as one graph where
    that is lower (extra.floor_method): the caption said "each part's median summed" of every floor, graph rows too."""
    v5 = build_report(load_runs([RESULTS / "floor-h200-v5"]))  # eager prefill and train, graph-timed decode
    caption = next(f for f in v5.figures if f.slug == "floor").caption
    assert "the parts' medians summed" in caption and "every part back to back, one CUDA graph" in caption
    eager = build_report(load_runs([RESULTS / "layer-prefill-h200"]))  # eager prefill only
    caption = next(f for f in eager.figures if f.slug == "floor").caption
    assert "the parts' medians summed" in caption and "CUDA graph" not in caption


def test_roofs_prefer_measured_peaks():
    assert roofs(CPU_ENV) == (CPU_ENV["peaks"], "measured peaks")
    peaks, source = roofs(H100_ENV)
    assert source == "datasheet H100 SXM" and peaks["bf16_matmul_tflops"] == 989.0
    assert roofs({**H100_ENV, "peaks": {"bf16_matmul_tflops": 700.0, "copy_gbps": 3000.0}})[1] == "measured peaks"
    assert roofs({"device": "NVIDIA A100-SXM4-80GB", "gpu": {"name": "NVIDIA A100-SXM4-80GB"}}) is None


def test_roofline_draws_each_runs_roof(report):
    roofline = next(f for f in report.figures if f.slug == "roofline")
    names = [trace.name for trace in roofline.figure.data if trace.mode == "lines"]
    assert names == ["h100 roof (datasheet H100 SXM: 989 TFLOP/s, 3350 GB/s)",
                     "cpu roof (measured peaks: 0.5 TFLOP/s, 10 GB/s)"]  # fmt: skip


@pytest.fixture(scope="module")
def committed() -> Report:
    """README's report: an H100 sweep beside the CPU baseline."""
    return build_report(load_runs([RESULTS / "gpu-default-h100", RESULTS / "baseline-cpu"]))


def test_report_of_committed_runs_stays_small(committed):
    """It was 13.6 MB: plotly.js inline and every field of every row written into each point's hover. Under
    6 MB, with every hover still complete."""
    report = committed
    assert len(report.to_html().encode()) < 6_000_000
    latency = report.figures[0].figure
    trace = latency.data[0]
    assert "<b>model</b>: h32d128" in trace.hovertemplate or "<b>model</b>: tiny" in trace.hovertemplate
    assert all("model" not in str(field) for field in trace.customdata[0]), "shared fields are written once"
    assert "<b>latency_ms</b>: " in hover_of(trace, 0)


def test_series_labels_name_each_field_once():
    frame = pd.DataFrame({"variant": ["fa", "head:3:1"], "mode": ["sequential", "streams"], "run": ["a", "a"]})
    assert list(series_labels(frame, ("mode",))) == ["fa · sequential", "head:3:1 · streams"]


def test_log_axes_label_decades_or_one_two_five_in_full(committed):
    """plotly's own log ticks write the 2s and 5s between decades as bare digits ('5 4 3 2 10 9 8')."""
    checked = 0
    for figure in committed.figures:
        layout = figure.figure.layout.to_plotly_json()
        for name, axis in layout.items():
            if name[1:5] == "axis" and axis.get("type") == "log" and axis.get("tickvals") is None:
                assert axis.get("tickformat") in ("~s", "~g"), (figure.slug, name)
                assert axis.get("dtick") in (1, "D2", None), (figure.slug, name)
                checked += 1
    assert checked > 10
    kernel = committed.figures[0].figure.layout.yaxis  # latency at kernel scope: 0.3 ms to 1 s, decades
    assert kernel.dtick == 1 and kernel.tickformat == "~g"


def test_flops_at_kernel_scope_on_a_log_axis_shows_the_gdn_core(committed):
    flops = next(f for f in committed.figures if f.slug == "flops-h32d128-prefill").figure
    assert flops.layout.yaxis.type == "log" and flops.layout.barmode == "group"
    gdn = [trace for trace in flops.data if trace.name == "GDN core"]
    assert gdn and all(min(trace.y) > 0 for trace in gdn)
    assert {trace.name for trace in flops.data} == {"FA core", "GDN core"}  # no bars, no legend, for zeros


def test_quality_variants_at_one_score_stay_apart():
    rows = pd.DataFrame([{"model": "tiny", "variant": variant, "task": task, "context": context, "metric": "acc",
                          "value": 0.0, "stderr": 0.0, "samples": 10, "status": "ok"}
                         for variant in ("teacher", "layer:3:1", "head:7:1") for task in ("passkey", "niah")
                         for context in (1024, 4096)])  # fmt: skip
    figure = quality_figure(rows).figure
    points = {(trace.xaxis, x, y) for trace in figure.data for x, y in zip(trace.x, trace.y, strict=True)}
    assert len(points) == len(rows), "no two points on one spot"
    assert all(axis.matches is None for axis in figure.select_yaxes())
    assert list(figure.layout.xaxis.tickvals) == [1024, 4096]


def test_training_panels_have_their_own_axes_and_plain_titles():
    """Stage 1 trains on a few percent of stage 2's tokens: a shared token axis squeezed it into a corner."""
    from hhbench.distill.train import read_train_rows
    from hhbench.report.figures import training_figure

    rows = pd.DataFrame(read_train_rows("results/distill-smollm2-135m-h200-v2/train.jsonl")).assign(run="r")
    figure = training_figure(rows).figure
    assert {axis.matches for axis in (figure.layout.xaxis, figure.layout.xaxis2)} == {None}
    assert sorted(note.text for note in figure.layout.annotations) == ["stage 1 (attention MSE)", "stage 2 (KL)"]


def test_memory_panels_plot_what_their_titles_say(report):
    """The figure's title names the model only; each measured-peak panel holds the rows of its title's scope and
    pass (one panel had mixed scopes, passes and runs under a title naming one scope)."""
    memory = next(f for f in report.figures if f.slug == "memory-tiny")
    assert memory.title == "Memory: tiny"
    titles = [note.text for note in memory.figure.layout.annotations]
    assert titles[0].startswith("analytic KV cache (solid) and recurrent state (dotted): tiny, model scope")
    assert titles[1:] == [f"measured peak memory: {scope} scope, {pass_}" for scope in ("kernel", "model")
                          for pass_ in ("prefill", "train", "decode")]  # fmt: skip
    checked = 0
    for trace in memory.figure.data:
        panel = 1 if trace.xaxis == "x" else int(trace.xaxis[1:])
        if panel == 1:
            continue
        scope, pass_ = re.fullmatch(r"measured peak memory: (\w+) scope, (\w+)", titles[panel - 1]).groups()
        for point in range(len(trace.x)):
            hover = hover_of(trace, point)
            assert f"<b>scope</b>: {scope}" in hover and f"<b>pass</b>: {pass_}" in hover
            checked += 1
    assert checked


def test_a_variant_keeps_its_colour_from_figure_to_figure():
    """The quality and loss figures of a distillation run: head:3:1 (eval's head:3:1@CHECKPOINT) one colour."""
    report = build_report(load_runs([RESULTS / "distill-smollm2-135m-h200-v2"]))
    colours: dict[str, set] = {}
    for figure in report.figures:
        for trace in figure.figure.data:
            variant = re.search(r"teacher|(?:head|layer):[\w:]+", trace.name)[0]  # less run and checkpoint
            colours.setdefault(variant, set()).add(trace.line.color)
    assert {"head:3:1", "layer:3:1", "head:7:1:selected"} <= set(colours)
    assert all(len(found) == 1 for found in colours.values()), colours
    assert len({colour for found in colours.values() for colour in found}) == len(colours)


def test_a_loss_curve_of_one_logged_step_shows():
    from hhbench.report.figures import training_figure

    rows = pd.DataFrame([{"kind": "step", "status": "ok", "run": "r", "variant": variant, "stage": 2, "step": 10,
                          "tokens": 4096, "loss": 1.5, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 1e4}
                         for variant in ("head:3:1", "layer:3:1")])  # fmt: skip
    figure = training_figure(rows).figure
    assert len(figure.data) == 2 and all("markers" in trace.mode for trace in figure.data)


def test_bars_grow_from_zero_on_every_linear_axis(tmp_path):
    """Bars of non-negative values start at 0: the kernel figure's decode panel started below it (plotly pads its
    range for the latency and floor markers beside the bars, and decode floors are near 0)."""
    rows = measured(analytic(contexts=[256, 4096], scopes=(Scope.LAYER,), ratios="3:1"))
    for row in rows:  # a profile: its kernel time split by kind
        row.extra["kernels"] = {"kernel_ms": 0.9 * row.latency_ms}
        row.extra["kernel_shares"] = {"floor": 0.6, "shared": 0.1, "rest": 0.3}
    figures = {
        figure.slug: figure.figure for figure in build_report(load_runs([write_run(tmp_path / "p", rows)])).figures
    }
    kernels = figures["kernels"]
    assert [note.text for note in kernels.layout.annotations] == ["pass=prefill", "pass=decode"]
    assert kernels.layout.xaxis2.rangemode == "tozero"  # the decode panel
    checked = 0
    for slug, figure in figures.items():
        for trace in figure.data:
            if trace.type == "bar":
                letter = "x" if trace.orientation == "h" else "y"
                axis = figure.layout[f"{letter}axis{(trace[f'{letter}axis'] or letter)[1:]}"]
                assert axis.type == "log" or axis.rangemode == "tozero", (slug, trace.name)
                checked += 1
    assert checked > 6 and {"kernels", "flops-tiny-prefill"} <= figures.keys()
