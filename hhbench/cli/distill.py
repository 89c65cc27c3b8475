"""`hhbench distill`: align, then distill converted hybrids on their teacher (issue 11), into results/<run>/."""

import contextlib
import dataclasses
import datetime
import shlex
from pathlib import Path
from typing import Annotated

import typer

from hhbench.cli.app import app
from hhbench.errors import UserError
from hhbench.files import run_folder
from hhbench.spec.units import parse_count, split_list

Opt = typer.Option


def parse_tokens(text: str, what: str) -> int:
    """'5M' -> 5 * 2^20, '20k' -> 20480, '0' -> 0 (the stage is skipped)."""
    return 0 if text.strip() == "0" else parse_count(text, what)


@app.command()
def distill(
    model: Annotated[
        str, Opt("--model", "-m", help="smollm2-135m, tiny-random-llama, or a local HF folder.")
    ] = "smollm2-135m",
    variants: Annotated[
        str, Opt(help="Students: head:R[:uniform|:random[:SEED]|:map=PATH|:selected], layer:R, la; comma-separated.")
    ] = "head:7:1:selected,head:7:1:random,head:3:1,layer:3:1",
    head_map: Annotated[str, Opt(help="Head-map JSON for head:R:selected (hhbench select-heads).")] = "",
    data: Annotated[
        list[str] | None, Opt(help="Text: files or folders of plain text or .jsonl with a 'text' field (repeatable).")
    ] = None,
    retrieval_ratio: Annotated[
        float, Opt(help="Fraction of sequences that are generated retrieval documents (1 without --data).")
    ] = 0.5,
    chat: Annotated[
        str, Opt(help="Retrieval documents in the chat template: auto (where the tokenizer has one), on, off.")
    ] = "auto",
    stage1_tokens: Annotated[str, Opt(help="Attention-alignment tokens: 5M, 20k (binary suffixes); 0 skips.")] = "5M",
    stage2_tokens: Annotated[str, Opt(help="Logit-distillation tokens; 0 skips.")] = "30M",
    seq: Annotated[int, Opt(help="Tokens per sequence (the eval context; >= 2K for real runs).")] = 2048,
    batch: Annotated[int, Opt(help="Sequences per optimizer step, over all data-parallel ranks.")] = 16,
    lr_new: Annotated[float, Opt(help="Learning rate of the new parameters.")] = 1e-3,
    lr_attn: Annotated[float, Opt(help="Learning rate of converted layers' q/k/v/o (stage 2, --train-attn).")] = 1e-4,
    train_attn: Annotated[bool, Opt(help="Stage 2 also trains the converted layers' attention projections.")] = False,
    schedule: Annotated[str, Opt(help="cosine or linear decay after warmup.")] = "cosine",
    warmup: Annotated[float, Opt(help="Warmup, a fraction of each stage's steps.")] = 0.05,
    min_lr_ratio: Annotated[float, Opt(help="Final learning rate as a fraction of the peak.")] = 0.1,
    weight_decay: Annotated[float, Opt(help="AdamW weight decay.")] = 0.0,
    grad_clip: Annotated[float, Opt(help="Max global gradient norm (0: none).")] = 1.0,
    answer_weight: Annotated[
        float, Opt(help="Stage 2 KL weight of answer positions (issue 11: 50 gave passkey 0.60 where 1 gave 0.00).")
    ] = 50.0,
    answer_ce: Annotated[float, Opt(help="Weight of cross-entropy on answer tokens added in stage 2 (0: none).")] = 0.0,
    seed: Annotated[int, Opt(help="Seed of the token stream.")] = 0,
    device: Annotated[str, Opt(help="auto, cpu or cuda (under torchrun: each rank its local GPU).")] = "auto",
    dtype: Annotated[str, Opt(help="Frozen weights: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16.")] = "auto",
    checkpoint_every: Annotated[int, Opt(help="Checkpoint every N steps (0: at the end of each stage).")] = 200,
    log_every: Annotated[int, Opt(help="A train.jsonl row every N steps.")] = 10,
    stop_after: Annotated[int, Opt(help="Stop after N optimizer steps (0: never); the run resumes later.")] = 0,
    threads: Annotated[
        int, Opt(help="CPU threads for torch on the CPU (0: torch's default). One is fastest for small models.")
    ] = 1,
    parallel_variants: Annotated[
        bool, Opt(help="Under torchrun: one variant per rank instead of data-parallel.")
    ] = False,
    fa_backend: Annotated[str, Opt(help="FA backend of converted layers.")] = "auto",
    gdn_backend: Annotated[
        str, Opt(help="GDN backend of converted layers (auto: fla-chunk on CUDA, torch-recurrent on the CPU).")
    ] = "auto",
    out: Annotated[str, Opt(help="Results folder; the run goes to OUT/RUN.")] = "results",
    run: Annotated[
        str | None,
        Opt(
            "--run",
            "--run-name",
            help="Run name (default distill-MODEL); an existing run resumes. Under torchrun "
            "spell it --run-name (torchrun takes --run for its own --run-path).",
        ),
    ] = None,
):
    """Distill converted students from their teacher: stage 1 aligns each converted attention layer (MSE on the
    teacher's hidden states), stage 2 matches the teacher's next-token distributions (KL, answers weighted).
    Writes recipe.json, env.json, train.jsonl and a checkpoint per variant; evaluate the students with
    `hhbench eval --variants VARIANT@OUT/RUN`."""
    import torch

    from hhbench.cli.sweep import set_cpu_threads
    from hhbench.distill import data as data_mod
    from hhbench.distill import recipe as recipe_mod
    from hhbench.distill import train as train_mod
    from hhbench.eval.harness import quiet_logs
    from hhbench.kernels.registry import FA, GDN, check_name
    from hhbench.launch.lock import run_lock
    from hhbench.measure.env import capture_env, pick_device
    from hhbench.models.convert import GDNInit, check_convertible
    from hhbench.models.loader import check_positions, load_model, offline
    from hhbench.models.variants import parse_variants
    from hhbench.rows.runs import RunDir

    offline()
    quiet_logs()
    run_path = run_folder(out, run if run is not None else f"distill-{Path(model).name}")  # --run "": a bad name
    variant_list = parse_variants(split_list(variants))
    tokens1, tokens2 = parse_tokens(stage1_tokens, "--stage1-tokens"), parse_tokens(stage2_tokens, "--stage2-tokens")
    if tokens1 + tokens2 == 0:
        raise UserError("zero tokens to train: give --stage1-tokens or --stage2-tokens above 0")
    if seq <= 0 or batch <= 0:
        raise UserError("--seq and --batch must be positive")
    if not 0 <= retrieval_ratio <= 1:
        raise UserError("--retrieval-ratio must lie in [0, 1]")
    if schedule not in ("cosine", "linear"):
        raise UserError(f"unknown --schedule {schedule!r}: cosine or linear")
    if chat not in ("auto", "on", "off"):
        raise UserError(f"--chat takes auto, on or off, not {chat!r}")
    if not 0 <= warmup < 1 or not 0 <= min_lr_ratio <= 1 or answer_weight <= 0 or answer_ce < 0 or lr_new <= 0:
        raise UserError(
            "--warmup in [0, 1), --min-lr-ratio in [0, 1], --answer-weight > 0, --answer-ce >= 0, --lr-new > 0"
        )
    if head_map and not Path(head_map).exists():
        raise UserError(f"no head map at {head_map}")
    texts = data_mod.read_texts(data) if data else []
    dist = train_mod.dist_from_env(
        parallel_variants, "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    )
    target = pick_device(device)
    if target.type == "cuda" and dist.world > 1:
        import os

        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(target)
    if dist.data_parallel and batch % dist.world:
        raise UserError(f"--batch {batch} does not split over {dist.world} data-parallel ranks")
    dtype = dtype if dtype != "auto" else ("bf16" if target.type == "cuda" else "fp32")
    set_cpu_threads(threads, target)  # small CPU models' ops are too small to share: 2 threads ran 6x slower
    if gdn_backend == "auto" and target.type == "cpu":
        gdn_backend = "torch-recurrent"  # trains ~2x faster than torch-chunk at small head dims (the same values)
    loaded = load_model(model, str(target), dtype)
    # an unknown name, or a backend that cannot train this model here, fails before the run folder (in training it
    # raised deep inside the first step); the kernels see bf16 on CUDA, where the steps run under autocast (train.Job)
    kernel_dtype = "bf16" if target.type == "cuda" else dtype
    for name, kind in ((fa_backend, FA), (gdn_backend, GDN)):
        check_name(name, kind, target.type, "train", kernel_dtype, loaded.shape.head_dim)
    check_positions(loaded, seq + 1, f"--seq {seq} and its next-token target")
    for variant in variant_list:  # bad head maps and refused conversions fail before the run folder is made
        plan = variant.plan(loaded.shape, head_map or None)
        if plan is None or not any(layer.n_la for layer in plan.layers):
            raise UserError(
                f"{variant.label} converts no attention head, so there is nothing to distill: students are "
                "head:R, layer:R or la with linear-attention heads"
            )
        check_convertible(loaded.model, plan)
    has_template = getattr(loaded.tokenizer, "chat_template", None) is not None
    use_chat = has_template if chat == "auto" else chat == "on"
    if use_chat and not has_template:
        raise UserError(f"--chat on, but {model}'s tokenizer has no chat template")
    stream = data_mod.TokenStream(loaded.tokenizer, seq, seed, retrieval_ratio, texts, use_chat)
    recipe = recipe_mod.Recipe(
        model=loaded.shape.name, variants=tuple(v.label for v in variant_list), head_map=head_map,
        data=tuple(data or ()), data_tokens=len(stream.corpus) if stream.corpus is not None else 0,
        retrieval_ratio=stream.retrieval_ratio, chat=use_chat, seq=seq, batch=batch, stage1_tokens=tokens1,
        stage2_tokens=tokens2, lr_new=lr_new, lr_attn=lr_attn, train_attn=train_attn, schedule=schedule,
        warmup=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, betas=(0.9, 0.95),
        grad_clip=grad_clip, answer_weight=answer_weight, answer_ce=answer_ce, seed=seed, dtype=dtype,
        init=dataclasses.asdict(GDNInit()),
    )  # fmt: skip
    run_dir = RunDir(run_path)
    with contextlib.ExitStack() as held:
        if dist.rank == 0:
            # The sweep's run lock (RUN/.lock): a second invocation writing this run is refused in one line. Rank 0
            # holds it for the whole job, as the rank that makes the run and, data-parallel, writes all of it; a
            # lock per rank would refuse this job's own ranks (under --parallel-variants the others write beside it).
            held.enter_context(run_lock(run_dir))
            recipe_mod.write_recipe(run_dir.path, recipe)
            if not run_dir.env_path.exists():
                started = datetime.datetime.now(datetime.UTC).isoformat()
                run_dir.write_env(capture_env({"command": "hhbench distill", "started": started, "world": dist.world}))
        if dist.world > 1:
            import torch.distributed

            torch.distributed.barrier()
            recipe_mod.write_recipe(run_dir.path, recipe)  # every rank checks the recipe rank 0 wrote
        say = typer.echo if dist.rank == 0 or dist.parallel_variants else (lambda *_: None)
        source = f"{len(texts)} documents ({recipe.data_tokens:,} tokens) mixed with" if texts else "no --data: only"
        say(f"run {run_dir.path}: {model} on {target} ({dtype}); {source} the generated retrieval stream "
            f"({recipe.retrieval_ratio:.0%} of sequences); stage 1 {recipe.steps(1)} steps, stage 2 {recipe.steps(2)} "
            f"steps of {batch} x {seq} tokens")  # fmt: skip
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"), TextColumn("eta"), TimeRemainingColumn(),
            console=Console(stderr=True), disable=not (dist.rank == 0 or dist.parallel_variants),
        )  # fmt: skip
        job = train_mod.Job(recipe, loaded, stream, run_dir.path, target, dist, checkpoint_every, max(1, log_every),
                            stop_after, fa_backend, gdn_backend, progress, say)  # fmt: skip
        with progress:
            summaries = train_mod.train(job, variant_list)
        for summary in summaries:
            if summary["status"] not in ("ok", train_mod.SKIPPED):
                say(f"{summary['variant']}: {summary['status']} {summary.get('reason', '')}".rstrip())
        students = ",".join(f"{v.label}@{run_dir.path}" for v in variant_list)
        # into the distillation's own run folder: `hhbench table` and `report` then show the students beside the curves
        evaluate = ["hhbench", "eval", "--model", model, "--variants", students, "--out", out, "--run", run_dir.name]
        if target.type == "cuda":
            evaluate += ["--device", "cuda"]
        say(f"students in {run_dir.path / 'checkpoints'}; evaluate with: {shlex.join(evaluate)}")
