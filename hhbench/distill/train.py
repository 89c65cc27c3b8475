"""The distillation loop: for each variant, stage 1 then stage 2, AdamW with warmup and cosine or linear decay,
gradient clipping, bf16 autocast on CUDA, a row in train.jsonl per logged step, a checkpoint every N steps and
at the end of each stage.

Parallelism (under torchrun): data-parallel by default, each rank takes its slice of every global batch and the
gradients are summed over ranks before clipping (the losses are sums over the global batch's denominators, so
N ranks step exactly as one process on the whole batch); with parallel_variants each rank trains its own
variants (rank r: variants r, r + N, ...) on the whole batch.
"""

import contextlib
import json
import math
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

from hhbench.distill import checkpoint, stages
from hhbench.distill.data import TokenStream
from hhbench.distill.recipe import Recipe
from hhbench.errors import UserError
from hhbench.eval.harness import EvalSettings, VariantModels
from hhbench.files import replace_whole
from hhbench.models.variants import Variant
from hhbench.rows.schema import ERROR, OK, append_row, read_json_lines

TRAIN = "train.jsonl"
SKIPPED = "skipped"


@dataclass
class TrainRow:
    """One logged optimizer step (kind "step") or one finished stage (kind "stage": its tokens, wall seconds of
    this invocation and tokens/s after its first step, teacher forward included; extra holds the first step's
    seconds and the tokens/s with it)."""

    variant: str
    stage: int
    step: int  # optimizer steps done in the stage
    tokens: int  # tokens trained in the stage (global batch)
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    seconds: float | None = None
    kind: str = "step"
    status: str = OK
    reason: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The row as JSON-ready data (train.jsonl)."""
        return asdict(self)


def read_train_rows(path: str | Path) -> list[dict]:
    """train.jsonl, the last row of each (variant, stage, step, kind), every TrainRow field filled: a resumed run
    logs again the steps after its last checkpoint, and those replace what the killed run had logged (train() cuts
    them from the file before it resumes; files written before it did keep both). Raises UserError as _train_lines."""
    latest: dict[tuple, dict] = {}
    for _, row in _train_lines(path)[1]:
        latest[(row["variant"], row["stage"], row["step"], row["kind"])] = row
    return list(latest.values())


def _train_lines(path: str | Path) -> tuple[str, list[tuple[str, dict]]]:
    """The text of a train.jsonl and (line, row) for each row in it, every TrainRow field in the row; a line cut short
    by a kill is left out (read_json_lines). Raises UserError, in one line naming the file and line, for an unreadable
    file or a line that is no training row."""
    lines = read_json_lines(path, "training rows")
    rows = []
    for number, line, data in lines.objects:
        if not _is_train_row(data):
            raise UserError(f"{path}:{number}: not a training row, got {json.dumps(data)[:40]}")
        rows.append((line, TrainRow(**data).to_dict()))
    return lines.text, rows


_FIELDS = {spec.name: spec for spec in fields(TrainRow)}
_KEY_TYPES = {"variant": str, "stage": int, "step": int, "kind": str}  # what read_train_rows keys (hashes) rows by


def _is_train_row(data: dict) -> bool:
    """Whether a JSON object is a TrainRow's: no other field, those without a default present, and the key's of their
    types (the numbers are not checked: an error row's loss is NaN or inf)."""
    required = {name for name, spec in _FIELDS.items() if spec.default is MISSING and spec.default_factory is MISSING}
    return (
        data.keys() <= _FIELDS.keys()
        and required <= data.keys()
        and all(name not in data or isinstance(data[name], kind) for name, kind in _KEY_TYPES.items())
    )


@dataclass(frozen=True)
class Dist:
    """This process's place under torchrun: world size, rank, and whether ranks split the variants rather than
    the batch (module docstring)."""

    world: int = 1
    rank: int = 0
    parallel_variants: bool = False

    @property
    def data_parallel(self) -> bool:
        """True when several ranks share every batch (not parallel_variants)."""
        return self.world > 1 and not self.parallel_variants

    @property
    def writes(self) -> bool:
        """Whether this rank writes rows and checkpoints: every rank its own variants, or rank 0 for all."""
        return self.parallel_variants or self.rank == 0

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over the ranks in place (all_reduce) when data-parallel; as it is otherwise."""
        if self.data_parallel:
            import torch.distributed as dist

            dist.all_reduce(value)
        return value

    def mine(self, variants: list[Variant]) -> list[Variant]:
        """The variants this rank trains: every world-th from its rank with parallel_variants, else all."""
        return variants[self.rank :: self.world] if self.parallel_variants and self.world > 1 else variants


def dist_from_env(parallel_variants: bool, device: str) -> Dist:
    """The torchrun process group (nccl on CUDA, gloo on the CPU), or one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(parallel_variants=parallel_variants)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(world, dist.get_rank(), parallel_variants)


def lr_factor(step: int, steps: int, recipe: Recipe) -> float:
    """Linear warmup over warmup * steps, then cosine or linear decay to min_lr_ratio at the last step."""
    warm = math.ceil(recipe.warmup * steps)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm - 1)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if recipe.schedule == "cosine" else 1 - progress
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * shape


@dataclass
class Job:
    """One distillation invocation: the recipe, the teacher, the token stream, the run folder, the device, the
    torchrun place, checkpoint and log intervals (steps), a step budget and the backends of the converted layers."""

    recipe: Recipe
    loaded: object  # hhbench.models.loader.LoadedModel: the teacher
    stream: TokenStream
    run_dir: Path
    device: torch.device
    dist: Dist = Dist()
    checkpoint_every: int = 0  # steps; 0: at the end of each stage only
    log_every: int = 10
    stop_after: int = 0  # optimizer steps in this invocation, then stop (a time-boxed run resumes later)
    fa_backend: str = "auto"
    gdn_backend: str = "auto"
    progress: object = None  # a rich Progress, or None
    echo: object = print
    steps_done: int = 0

    def __post_init__(self):
        settings = EvalSettings(model=self.recipe.model, limit=0, head_map=self.recipe.head_map or None,
                                fa_backend=self.fa_backend, gdn_backend=self.gdn_backend)  # fmt: skip
        self.builder = VariantModels(self.loaded, settings)

    def autocast(self):
        """bf16 autocast on CUDA; nothing on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def log(self, row: TrainRow) -> None:
        """Append `row` to the run's train.jsonl, where this rank writes."""
        if self.dist.writes:
            append_row(self.run_dir / TRAIN, row)

    def batch(self, stage: int, step: int):
        """This rank's slice of the global batch `step` of `stage`, on the device."""
        B = self.recipe.batch
        share = B // self.dist.world if self.dist.data_parallel else B
        offset = self.dist.rank * share if self.dist.data_parallel else 0
        ids, answer = self.stream.batch(self.recipe.first_sequence(stage) + step * B + offset, share)
        return ids.to(self.device, non_blocking=True), answer.to(self.device, non_blocking=True)


def _loss(job: Job, student, stage: int, ids, answer) -> torch.Tensor:
    """This rank's part of the global loss (its sums over the global denominators)."""
    teacher = job.loaded.model
    recipe = job.recipe
    with job.autocast():
        if stage == 1:
            total, count = stages.alignment_loss(student, teacher, ids)
            return total / job.dist.total(torch.tensor(count, device=ids.device))
        kl, nll, weight, answers = stages.distillation_loss(student, teacher, ids, answer, recipe.answer_weight)
        sums = job.dist.total(torch.tensor([weight, answers], device=ids.device))
        loss = kl / sums[0]
        if recipe.answer_ce:
            loss = loss + recipe.answer_ce * nll / sums[1].clamp(min=1)
        return loss


def _sum_grads(job: Job, params: list[torch.nn.Parameter]) -> None:
    if not job.dist.data_parallel:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    job.dist.total(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def train_variant(job: Job, variant: Variant) -> dict:
    """Both stages of one variant, resumed from its checkpoint where one exists. Returns its summary."""
    recipe = job.recipe
    student, plan = job.builder.build(variant)
    if student is job.loaded.model:  # no GDN head: the student is the teacher, nothing to train
        job.log(TrainRow(variant.label, 0, 0, 0, kind="stage", status=SKIPPED, reason="no converted layer"))
        return {"variant": variant.label, "status": SKIPPED}
    student.requires_grad_(False)
    fa_heads = [list(layer.fa_heads) for layer in plan.layers]
    state = checkpoint.load_state(job.run_dir, variant.label)
    done = (0, 0)
    if state is not None:
        checkpoint.load_weights(job.run_dir, variant.label, student)
        done = (state["stage"], state["step"])
        if state.get("status", OK) != OK:
            return {"variant": variant.label, "status": state["status"], "reason": state.get("reason", "")}
    saved = [n for group in stages.trained_parameters(student, 2, recipe.train_attn).values() for n, _ in group]
    summary = {"variant": variant.label, "status": OK}
    for stage in (1, 2):
        steps = recipe.steps(stage)
        if steps == 0 or (stage, steps) <= done:
            continue
        groups = stages.trained_parameters(student, stage, recipe.train_attn)
        params = []
        for _, param in groups["new"] + groups["attn"]:
            param.data = param.data.float()  # fp32 masters; the frozen weights stay in the teacher's dtype
            param.requires_grad_(True)
            params.append(param)
        if groups["attn"]:
            stages.keep_fa_heads(student)
        optimizer = torch.optim.AdamW(
            [{"params": [p for _, p in groups[g]], "lr": lr, "base_lr": lr}
             for g, lr in (("new", recipe.lr_new), ("attn", recipe.lr_attn)) if groups[g]],
            betas=recipe.betas, weight_decay=recipe.weight_decay,
        )  # fmt: skip
        start = 0
        if state is not None and state["stage"] == stage:
            optimizer.load_state_dict(state["optimizer"])
            start = state["step"]
        result = _run_stage(job, variant, student, stage, steps, start, optimizer, params, saved, fa_heads)
        summary[f"stage{stage}"] = result
        if result["status"] != OK:
            summary.update(status=result["status"], reason=result.get("reason", ""))
            break
        if job.stop_after and job.steps_done >= job.stop_after:
            summary["status"] = "stopped"
            break
    return summary


def _run_stage(job, variant, student, stage, steps, start, optimizer, params, saved, fa_heads) -> dict:
    recipe = job.recipe
    tokens_per_step = recipe.batch * recipe.seq
    task = None
    if job.progress is not None:
        task = job.progress.add_task(
            f"{variant.label} stage {stage}", total=steps, completed=start, loss="-", speed="-"
        )

    def save(step: int, status: str = OK, reason: str = "") -> None:
        if not job.dist.writes:
            return
        meta = {"model": job.loaded.shape.name, "variant": variant.label, "recipe": recipe.to_dict(),
                "fa_heads": fa_heads, "stage": stage, "step": step, "tokens": _tokens_trained(recipe, stage, step),
                "status": status}  # fmt: skip
        state = {"stage": stage, "step": step, "optimizer": optimizer.state_dict(), "status": status, "reason": reason}
        checkpoint.save(job.run_dir, variant.label, student, saved, meta, state)

    began = mark = time.perf_counter()
    marked = start
    first_done = None  # when this invocation's first step ended: it pays the kernels' compiles and autotuning
    for step in range(start, steps):
        factor = lr_factor(step, steps, recipe)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        ids, answer = job.batch(stage, step)
        loss = _loss(job, student, stage, ids, answer)
        loss.backward()
        _sum_grads(job, params)
        clip = recipe.grad_clip if recipe.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        value = float(job.dist.total(loss.detach().clone()))
        if not math.isfinite(value):
            reason = f"loss is {value} at stage {stage} step {step + 1}"
            job.log(TrainRow(variant.label, stage, step + 1, (step + 1) * tokens_per_step, value, kind="stage",
                             status=ERROR, reason=reason))  # fmt: skip
            save(step, ERROR, reason)
            job.echo(f"{variant.label}: stopped, {reason}")
            return {"status": ERROR, "reason": reason}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        job.steps_done += 1
        if first_done is None:
            first_done = time.perf_counter()
        last = step + 1 == steps or (job.stop_after and job.steps_done >= job.stop_after)
        if (step + 1) % job.log_every == 0 or last:
            now = time.perf_counter()
            speed = (step + 1 - marked) * tokens_per_step / max(now - mark, 1e-9)
            mark, marked = now, step + 1
            job.log(TrainRow(variant.label, stage, step + 1, (step + 1) * tokens_per_step, value,
                             optimizer.param_groups[0]["lr"], float(grad_norm), round(speed, 1)))  # fmt: skip
            if task is not None:
                job.progress.update(task, completed=step + 1, loss=f"{value:.4f}", speed=f"{speed:,.0f}")
        if last or (job.checkpoint_every and (step + 1) % job.checkpoint_every == 0):
            save(step + 1)
        if last and step + 1 < steps:
            return {"status": OK, "steps": step + 1 - start}
    ended = time.perf_counter()
    seconds = ended - began
    tokens = (steps - start) * tokens_per_step
    speed = tokens / max(seconds, 1e-9)
    # Throughput is the steady state: the steps after the first, whose time is mostly compiling (TileLang compiles
    # each new shape for 10-20 s); the first step and the speed with it included are recorded beside it.
    first_s = first_done - began
    steady = (tokens - tokens_per_step) / (ended - first_done) if steps - start > 1 else speed
    job.log(TrainRow(variant.label, stage, steps, steps * tokens_per_step, kind="stage", seconds=round(seconds, 2),
                     tokens_per_s=round(steady, 1), extra={"tokens_this_run": tokens, "device": str(job.device),
                            "first_step_s": round(first_s, 2), "tokens_per_s_with_first_step": round(speed, 1),
                            "data_parallel_ranks": job.dist.world if job.dist.data_parallel else 1}))  # fmt: skip
    job.echo(
        f"{variant.label} stage {stage}: {steps * tokens_per_step:,} tokens, {seconds:.1f} s (first step "
        f"{first_s:.1f} s), {steady:,.0f} tokens/s after the first step"
    )
    return {"status": OK, "tokens": steps * tokens_per_step, "seconds": seconds, "tokens_per_s": steady}


def _tokens_trained(recipe: Recipe, stage: int, step: int) -> int:
    """Tokens of both stages up to `step` of `stage`."""
    before = recipe.steps(1) * recipe.batch * recipe.seq if stage == 2 else 0
    return before + step * recipe.batch * recipe.seq


def drop_unsaved_rows(run_dir: Path, labels: list[str]) -> None:
    """Cut from run_dir's train.jsonl the rows that the variants `labels` logged after their last checkpoint
    (every row of a variant without one, and a line cut short by a kill): the steps a resumed run trains and logs
    again, so that the resumed file holds what an uninterrupted run's does. A variant stopped by an error keeps its
    rows (its checkpoint is the step before the error row, and it does not train again). The file is replaced whole
    (files.replace_whole): a kill leaves the old file or the new one. Raises UserError for a line that is no training
    row (_train_lines), where such a line was dropped unseen."""
    path = Path(run_dir) / TRAIN
    if not path.exists():
        return
    saved = {}  # label -> the (stage, step) of its checkpoint; rows after it go
    for label in labels:
        meta = checkpoint.read_meta(run_dir, label)
        if meta is None:
            saved[label] = (-1, -1)
        elif meta.get("status", OK) == OK:
            saved[label] = (meta["stage"], meta["step"])
    text, rows = _train_lines(path)
    kept = [
        line + "\n"
        for line, row in rows
        if row["variant"] not in saved or (row["stage"], row["step"]) <= saved[row["variant"]]
    ]
    if "".join(kept) != text:
        with replace_whole(path) as out:
            out.write("".join(kept))


def train(job: Job, variants: list[Variant]) -> list[dict]:
    """Every variant this rank trains, one after another; a variant that fails (NaN loss) does not stop the
    others. Rank 0 first cuts the rows logged after each variant's checkpoint (drop_unsaved_rows), before any rank
    appends."""
    if job.dist.rank == 0:
        drop_unsaved_rows(job.run_dir, [variant.label for variant in variants])
    if job.dist.world > 1:
        import torch.distributed

        torch.distributed.barrier()
    summaries = []
    for variant in job.dist.mine(variants):
        summaries.append(train_variant(job, variant))
        if job.stop_after and job.steps_done >= job.stop_after:
            break
    return summaries
