"""`hhbench flops`: the analytic cost model as a table, JSON rows or CSV, and the claim check."""

import json
import math
from typing import Annotated

import typer

from hhbench.analytic.claims import claim_points, claim_sentences
from hhbench.analytic.rows import analytic_rows
from hhbench.cli.app import app
from hhbench.errors import UserError
from hhbench.files import open_output
from hhbench.rows.schema import RowSet, markdown_table
from hhbench.spec import parse as options
from hhbench.spec.axes import Scope, dtype_bytes
from hhbench.spec.hybrid import LAYER31, GDNConfig, HybridSpec
from hhbench.spec.layout import distinct_plans
from hhbench.spec.units import format_bytes, format_count

Opt = typer.Option


def si(value: float) -> str:
    """FLOPs with an SI prefix, three significant digits: 1.5e12 -> '1.5T'."""
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def with_layer31_ratios(shape, specs, contexts, passes, batch, scope, dtype):
    """The analytic rows of `specs` (pairs of requested ratio text and spec) as a frame, one line per row in
    analytic_rows' order, with vs_layer31_flops and vs_layer31_kv: flops_total and kv_cache_bytes over those of
    the layer-wise 3:1 plan at the same point (tables.compare's rule; NaN where the baseline's is 0), its row
    costed here where the specs lack it."""
    from hhbench.tables.compare import against_layer31

    asked = {plan.spec.label for _, plan in distinct_plans(shape, specs)}
    baseline = HybridSpec(LAYER31.layout, LAYER31.ratio, specs[0][1].gdn if specs else GDNConfig())
    rows = RowSet(analytic_rows(shape, [*specs, (str(LAYER31.ratio), baseline)], contexts, passes, batch, scope,
                                dtype))  # fmt: skip
    compared = against_layer31(rows.frame())
    frame = rows.frame().assign(vs_layer31_flops=compared["flops_ratio"], vs_layer31_kv=compared["kv_ratio"])
    return frame[frame["variant"].isin(asked)].reset_index(drop=True)


def human_table(frame) -> str:
    """The flops command's markdown table: head counts, FLOPs by component (SI prefixes), KV cache and state
    (binary units), and the ratios to layer-wise 3:1."""
    view = frame[["model", "variant", "ratio_effective", "fa_heads", "la_heads", "kv_groups", "pass", "context"]].copy()
    view["context"] = frame["context"].map(format_count)
    for column in ("fa_heads", "la_heads", "kv_groups"):
        view[column] = frame[column].map(lambda v: f"{v:g}")
    for column in ("flops_total", "flops_attention", "flops_fa_core", "flops_gdn_core", "flops_proj", "flops_mlp"):
        view[column.removeprefix("flops_") + "_flops"] = frame[column].map(si)
    view["kv_cache"] = frame["kv_cache_bytes"].map(format_bytes)
    view["state"] = frame["state_bytes"].map(format_bytes)
    view["vs_l31_flops"] = frame["vs_layer31_flops"].map(lambda v: f"{v:.3f}")
    view["vs_l31_kv"] = frame["vs_layer31_kv"].map(lambda v: f"{v:.3f}")
    return markdown_table(view)


def plan_tables(shape, specs) -> str:
    """Per variant, per layer: which heads are FA and how many KV groups they read (what sets the KV cache)."""
    import pandas as pd

    blocks = []
    for _, layer_plan in distinct_plans(shape, specs):
        frame = pd.DataFrame(
            [
                {
                    "layer": i,
                    "weight": f"{layer.weight:g}",
                    "fa_heads": " ".join(map(str, layer.fa_heads)) or "-",
                    "n_fa": layer.n_fa,
                    "n_la": layer.n_la,
                    "kv_groups": layer.kv_groups,
                }  # fmt: skip
                for i, layer in enumerate(layer_plan.layers)
            ]
        )
        title = f"{shape.name} {layer_plan.spec.label}: ratio_effective {layer_plan.ratio_effective}, "
        title += f"{layer_plan.fa_heads:g} FA heads, {layer_plan.kv_groups:g} KV groups in all"
        blocks.append(f"{title}\n\n{markdown_table(frame)}")
    return "\n\n".join(blocks)


@app.command()
def flops(
    model: Annotated[
        str,
        Opt(
            "--model",
            "-m",
            help="Presets (qwen3-1.7b, llama3-8b, smollm2-135m, h32d128, tiny) or config.json paths, comma-separated.",
        ),
    ] = "qwen3-1.7b",
    set_: Annotated[list[str], Opt("--set", help="Override a shape field, e.g. --set n_layers=4 (repeatable).")] = [],  # noqa: B006
    layouts: Annotated[str, Opt(help="Comma-separated: head, layer, fa, la.")] = "head,layer",
    ratios: Annotated[
        str, Opt(help="LA:FA ratios, comma-separated; 0:1 is all FA, 1:0 all linear.")
    ] = "0:1,1:1,3:1,7:1,15:1,1:0",
    contexts: Annotated[str, Opt(help="Context lengths: 4k, 4096, 1m.")] = "4k,32k,128k,512k",
    pass_: Annotated[str, Opt("--pass", "--passes", help="prefill, train, decode.")] = "prefill,decode",
    batch: Annotated[int, Opt(help="Sequences per batch.")] = 1,
    scope: Annotated[
        str, Opt(help="model (whole network), layer (one attention layer), kernel (cores only).")
    ] = "model",
    dtype: Annotated[str, Opt(help="Activation and KV-cache dtype: bf16, fp16, fp32.")] = "bf16",
    gdn_chunk: Annotated[int, Opt(help="GDN chunk size.")] = 64,
    gdn_dk: Annotated[int, Opt(help="GDN key head dim (0: the model's head_dim).")] = 0,
    gdn_dv: Annotated[int, Opt(help="GDN value head dim (0: the model's head_dim).")] = 0,
    head_map: Annotated[str, Opt(help="Head-map JSON (fa_heads or scores per layer) for the head layout.")] = "",
    kv_aware: Annotated[bool, Opt(help="Pack FA heads into as few KV groups as possible.")] = False,
    as_json: Annotated[bool, Opt("--json", help="Print rows as JSON lines.")] = False,
    csv: Annotated[str, Opt(help="Also write the rows to this CSV file.")] = "",
    claims: Annotated[bool, Opt(help="Check the 'cuts attention FLOPs by ~1/3 to 40%' claim instead.")] = False,
    plan: Annotated[bool, Opt(help="Print each variant's per-layer plan (FA heads, KV groups) instead.")] = False,
):
    """Analytic FLOPs and memory of hybrid layouts, against the layer-wise 3:1 baseline."""
    # --claims and --plan print instead of the cost rows, which --json and --csv are the forms of
    if claims and (plan or as_json or csv):
        raise UserError("--claims is a view of its own: give it without --plan, --json or --csv")
    if plan and (as_json or csv):
        raise UserError("--plan is a view of its own: give it without --json or --csv")
    shapes = options.models(model, set_)
    context_values = options.contexts(contexts)
    pass_values = options.passes(pass_)
    options.positive(batch, "batch")
    dtype_bytes(dtype)
    scope_value = Scope.parse(scope)
    gdn = GDNConfig(chunk_size=gdn_chunk, head_k_dim=gdn_dk or None, head_v_dim=gdn_dv or None)
    if claims:
        for shape in shapes:
            for pass_value in pass_values:
                points = claim_points(shape, context_values, pass_value, batch)
                for sentence in claim_sentences(shape, points, pass_value):
                    typer.echo(sentence)
        return
    specs = options.hybrid_specs(layouts, ratios, gdn, head_map or None, kv_aware)
    if plan:
        typer.echo("\n\n".join(plan_tables(shape, specs) for shape in shapes))
        return
    import pandas as pd

    frame = pd.concat(
        [with_layer31_ratios(shape, specs, context_values, pass_values, batch, scope_value, dtype) for shape in shapes],
        ignore_index=True,
    )
    if csv:
        with open_output(csv, "w") as out:
            frame.drop(columns=["samples_ms", "extra"]).to_csv(out, index=False)
    if as_json:
        for record in frame.to_dict("records"):
            typer.echo(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in record.items()}))  # fmt: skip
    else:
        typer.echo(human_table(frame))
