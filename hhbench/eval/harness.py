"""Runs lm-eval on model variants over tasks and context lengths and writes eval rows, one per metric, resumably.

Tasks are hhbench's own long-context suite (suites/lm_eval: passkey, niah_single, niah_multikey, vt, copy,
generated offline by hhbench.eval.generators) or lm-eval's tasks by name; lm-eval's RULER tasks
(niah_single_1, ruler_vt, ...) generate their data from the model's tokenizer, which is handed to them as a local
folder (metadata "tokenizer"), with the length as "max_seq_lengths".
"""

import contextlib
import copy
import gc
import io
import logging
import re
import time
import unittest.mock
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hhbench.errors import UserError, require_extra
from hhbench.eval import generators
from hhbench.models.convert import GDNInit, convert, teacher_head_rms, teacher_head_tau
from hhbench.models.loader import LoadedModel
from hhbench.models.tokens import encode
from hhbench.models.variants import Variant
from hhbench.resources import suites_dir
from hhbench.rows.schema import ERROR, OK, EvalRow
from hhbench.spec.parse import unique

HH_PREFIX = "hh_"


def lm_eval_dir() -> Path:
    """The folder of lm-eval's own task YAMLs (lm_eval/tasks)."""
    return Path(require_extra("lm_eval").__file__).parent / "tasks"


def suite_dir() -> Path:
    """hhbench's lm-eval task files (suites/lm_eval); UserError where they are missing."""
    folder = suites_dir() / "lm_eval"
    if not (folder / "hh_passkey.yaml").exists():
        raise UserError(f"hhbench's task suite is missing at {folder}: reinstall hhbench")
    return folder


@dataclass(frozen=True)
class TaskRef:
    """A task as the user names it, and what lm-eval calls it."""

    name: str  # passkey | niah_single_1 | ...
    lm_eval_name: str
    own: bool  # one of hhbench's tasks

    @property
    def ruler(self) -> bool:
        """lm-eval's RULER tasks: they generate their data from the model's tokenizer (metadata "tokenizer")."""
        return not self.own and (self.name.startswith(("niah_", "ruler_")) or self.name == "ruler")


def parse_tasks(names: list[str]) -> list[TaskRef]:
    """Our short names (passkey, niah_single, niah_multikey, vt, copy) or lm-eval task names."""
    tasks = []
    for name in names:
        if name in generators.TASKS:
            tasks.append(TaskRef(name, HH_PREFIX + name, True))
        elif name.startswith(HH_PREFIX) and name[len(HH_PREFIX) :] in generators.TASKS:
            tasks.append(TaskRef(name[len(HH_PREFIX) :], name, True))
        else:
            tasks.append(TaskRef(name, name, False))
    if not tasks:
        raise UserError("no task given")
    return unique(tasks)  # passkey and hh_passkey are one task


def task_manager(task: TaskRef, metadata: dict):
    """A TaskManager that knows `task`, scanning as little as possible (lm-eval's full index takes ~30 s)."""
    TaskManager = require_extra("lm_eval.tasks").TaskManager
    if task.own:
        return TaskManager(include_path=str(suite_dir()), include_defaults=False, metadata=metadata)
    if task.ruler:
        return TaskManager(include_path=str(lm_eval_dir() / "ruler"), include_defaults=False, metadata=metadata)
    return TaskManager(metadata=metadata)


def check_tasks(tasks: list[TaskRef]) -> None:
    """Unknown task names fail in one line before any model is loaded. lm-eval's own index takes ~30 s to build,
    so a name that no task file of lm-eval even mentions is refused from a plain text scan of those files."""
    require_extra("lm_eval")  # every task runs in lm-eval: without it, one line here rather than an error row each
    others = [t for t in tasks if not t.own]
    if not others:
        return
    texts = [path.read_text(errors="ignore") for path in lm_eval_dir().rglob("*.yaml")]
    for task in others:
        pattern = re.compile(rf"^\s*(task|group|tag)\s*:\s*[\"']?{re.escape(task.lm_eval_name)}[\"']?\s*$", re.M)
        listed = re.compile(rf"^\s*-\s*[\"']?{re.escape(task.lm_eval_name)}[\"']?\s*$", re.M)
        if not any(pattern.search(text) or listed.search(text) for text in texts):
            raise UserError(
                f"unknown task {task.name!r}: hhbench's are {', '.join(generators.TASKS)}; otherwise an lm-eval "
                "task name (e.g. niah_single_1)"
            )


@dataclass
class EvalSettings:
    """One eval run's settings: model, samples per task and length (`limit`), seed, chat template, lm-eval batch
    size, device ("cpu", "cuda"), dtype name, run name, head map path and the converted layers' backends."""

    model: str
    limit: int
    seed: int = 0
    chat: bool = True
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "fp32"
    run: str = ""
    head_map: str | None = None
    fa_backend: str = "auto"
    gdn_backend: str = "auto"
    extra: dict = field(default_factory=dict)

    def fingerprint(self) -> dict:
        """What must agree for a finished row to count as this run's (resume)."""
        return {"limit": self.limit, "seed": self.seed, "chat": self.chat, "dtype": self.dtype}


def calibration_ids(loaded: LoadedModel, length: int = 512, seed: int = 1234) -> torch.Tensor:
    """Calibration tokens for the GDN init (gammas, decays) [1, length]: essay-like filler from the task generators
    (not any evaluated sample), tokenized as the evaluated prompts are (BOS where the tokenizer adds it)."""
    import random

    text = " ".join(generators.essay_filler(random.Random(seed), 4 * length))
    return torch.tensor([encode(loaded.tokenizer, text)[:length]])  # special tokens as in evaluation


class VariantModels:
    """Builds each variant from one loaded teacher (deep copies; the teacher itself stays unconverted), its GDN
    heads initialized as GDNInit() says from the teacher's statistics on the calibration tokens."""

    def __init__(self, loaded: LoadedModel, settings: EvalSettings):
        self.loaded, self.settings = loaded, settings
        self.init = GDNInit()
        self._stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def teacher_stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(calibration ids, head RMS, head tau): computed once, shared by every variant."""
        if self._stats is None:
            ids = calibration_ids(self.loaded)
            model = self.loaded.model
            self._stats = (ids, teacher_head_rms(model, ids), teacher_head_tau(model, ids, self.init))
        return self._stats

    def build(self, variant: Variant):
        """(model, plan) of a variant: the teacher itself, a fresh conversion, or a distilled student (the
        conversion with its checkpoint's parameters; the model's `hhbench_student` says which)."""
        if variant.checkpoint:
            from hhbench.distill.checkpoint import load_student

            model = load_student(variant.checkpoint, variant.base_label, self.loaded, self.settings.fa_backend,
                                 self.settings.gdn_backend)  # fmt: skip
            return model, model.hhbench_plan
        plan = variant.plan(self.loaded.shape, self.settings.head_map)
        if plan is None or not any(layer.n_la for layer in plan.layers):
            return self.loaded.model, plan
        ids, rms, tau = self.teacher_stats()
        model = convert(
            copy.deepcopy(self.loaded.model),
            plan,
            rms,
            self.init,
            fa_backend=self.settings.fa_backend,
            gdn_backend=self.settings.gdn_backend,
            head_tau=tau,
            calibration_ids=ids,
        )
        return model, plan


def hflm(model, loaded: LoadedModel, batch_size: int, device: str, max_length: int):
    """lm-eval's HFLM around an already loaded (or converted) model and its tokenizer; max_length in tokens."""
    return require_extra("lm_eval.models.huggingface").HFLM(
        pretrained=model, tokenizer=loaded.tokenizer, batch_size=batch_size, max_length=max_length, device=device
    )


def evaluate_task(lm, task: TaskRef, length: int, settings: EvalSettings, tokenizer_dir: str) -> dict:
    """One lm-eval run of one task at one length: {metric: (value, stderr)}, sample count, a few examples."""
    lm_eval = require_extra("lm_eval")
    metadata = {
        "tokenizer": tokenizer_dir,
        "max_seq_lengths": [length],
        "hh_samples": settings.limit,
        "hh_seed": settings.seed,
        "hh_chat": settings.chat,
    }
    manager = task_manager(task, metadata)
    with contextlib.redirect_stdout(io.StringIO()), no_downloads(), quiet_git():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task.lm_eval_name],
            task_manager=manager,
            limit=settings.limit,
            log_samples=True,
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
            bootstrap_iters=0,
        )
    found = results["results"][task.lm_eval_name]
    metrics = {}
    for key, value in found.items():
        name, _, filter_ = key.partition(",")
        if not filter_ or name.endswith("_stderr") or not isinstance(value, int | float):
            continue
        stderr = found.get(f"{name}_stderr,{filter_}")
        if not task.own and name.isdigit():  # RULER names its metrics by length, -1 for the lengths not run
            if name != str(length):
                continue
            name = generators.PRIMARY_METRIC
        metrics[name] = (float(value), float(stderr) if isinstance(stderr, int | float) else None)
    samples = results.get("samples", {}).get(task.lm_eval_name, [])
    for name, (value, stderr) in list(metrics.items()):  # lm-eval gives none with bootstrap_iters=0
        key = name if task.own else str(length)
        values = [float(s[key]) for s in samples if isinstance(s.get(key), int | float)]
        if stderr is None and values:
            metrics[name] = (value, sample_stderr(values))
    examples = [
        {
            "target": s.get("target"),
            "output": (s.get("filtered_resps") or [""])[0],
            "length": s.get("doc", {}).get("length"),
        }
        for s in samples[:3]
    ]
    # each sample's prompt in the model's tokens, as lm-eval encoded it (a log-likelihood sample has two contexts)
    prompt_tokens = [max(len(lm.tok_encode(request[0])) for request in s["arguments"]) for s in samples]
    return {"metrics": metrics, "samples": len(samples), "examples": examples, "prompt_tokens": prompt_tokens}


@contextlib.contextmanager
def no_downloads():
    """nltk.download refused for the duration: lm-eval's RULER tasks call nltk.download("punkt_tab") when they
    are imported and nltk lacks it, and nothing may download at run time (not even try, offline). What then
    needs punkt (RULER's essay haystacks) fails on its own rows with nltk's LookupError."""
    try:
        import nltk
    except ImportError:
        yield
        return
    with unittest.mock.patch.object(nltk, "download", lambda *args, **kwargs: False):
        yield


@contextlib.contextmanager
def quiet_git():
    """lm-eval records `git describe` of the working folder with git's stderr left on the terminal: outside a
    checkout every evaluation printed "fatal: not a git repository". The same call, with that stderr dropped
    (hhbench records its own commit in env.json)."""
    import subprocess

    evaluator = require_extra("lm_eval.evaluator")

    def describe() -> str | None:
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return (out.stdout.strip() or None) if out.returncode == 0 else None

    with unittest.mock.patch.object(evaluator, "get_git_commit_hash", describe):
        yield


def sample_stderr(values: list[float]) -> float | None:
    """Standard error of the mean of per-sample values (n - 1 in the variance); None for fewer than two."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def done_keys(rows, settings: EvalSettings) -> set[tuple[str, str, int]]:
    """(variant, task, context) already finished by this run, with the same settings; a finished row made with
    other settings is the user's mistake, said in one line."""
    done = set()
    for row in rows:
        if row.status != OK or row.model != settings.model:
            continue
        made = row.extra.get("settings", {})
        if made and made != settings.fingerprint():
            raise UserError(
                f"run {settings.run} holds rows made with {made}, not {settings.fingerprint()}: "
                "use the same settings to resume, or another --run"
            )
        done.add((row.variant, row.task, row.context))
    return done


def check_resumable(rows, settings: EvalSettings, chat: str) -> None:
    """The early form of done_keys' check, before the model (and so the chat setting) is known."""
    for row in rows:
        made = dict(row.extra.get("settings", {}))
        wanted = settings.fingerprint()
        if chat == "auto":
            made.pop("chat", None)
            wanted.pop("chat", None)
        else:
            wanted["chat"] = chat == "on"
        if row.status == OK and made and made != wanted:
            raise UserError(
                f"run {settings.run} holds rows made with {row.extra['settings']}: use the same settings to "
                "resume, or another --run"
            )


def eval_rows(
    variant: Variant, plan, task: TaskRef, length: int, settings: EvalSettings, result: dict | None, error: str,
    seconds: float, device: str, student: dict | None = None,
) -> list[EvalRow]:  # fmt: skip
    """The EvalRows of one variant on one task at one length: one per metric of result["metrics"] (evaluate_task's
    result; rows in error where its prompts exceed `length` tokens), or one error row saying `error` where result
    is None. seconds: the task's wall time; student: a distilled student's checkpoint, stage and tokens."""
    common = {
        "model": settings.model,
        "variant": variant.label,
        "task": task.name,
        "context": length,
        "ratio_effective": plan.ratio_effective if plan is not None else "0:1",
        "fa_heads": float(plan.fa_heads) if plan is not None else 0.0,
        "la_heads": float(plan.la_heads) if plan is not None else 0.0,
        "device": device,
        "seconds": round(seconds, 2),
        "seed": settings.seed,
        "run": settings.run,
    }
    if plan is None:
        # the teacher: every head full attention
        common["fa_heads"] = float(settings.extra.get("n_layers", 0) * settings.extra.get("n_heads", 0))
    extra = {"settings": settings.fingerprint(), "lm_eval_task": task.lm_eval_name, "dtype": settings.dtype}
    if student is not None:  # a distilled student: which checkpoint, after how many tokens
        extra.update(checkpoint=student["checkpoint"], tokens_trained=student["tokens_trained"],
                     stage=student["stage"])  # fmt: skip
    if variant.heads != "uniform" and student is None:
        extra["head_map"] = variant.argument if variant.heads == "map" else settings.head_map or variant.argument
    if result is None:
        return [EvalRow(metric=generators.primary_metric(task.name), status=ERROR, reason=error, extra=extra, **common)]
    extra["examples"] = result["examples"]
    tokens = result["prompt_tokens"]
    status, reason = OK, ""
    if tokens and max(tokens) > length:  # the row would claim a context its prompts exceed
        status, reason = ERROR, f"prompts of up to {max(tokens)} tokens exceed the context {length}"
    rows = []
    for metric, (value, stderr) in result["metrics"].items():
        rows.append(
            EvalRow(
                metric=metric,
                value=value,
                stderr=stderr,
                samples=result["samples"],
                prompt_tokens=tokens,
                status=status,
                reason=reason,
                extra=extra,
                **common,
            )
        )
    return rows


def quiet_logs() -> None:
    """lm-eval's, transformers' and datasets' logs at errors only, their progress bars off."""
    for name in ("lm_eval", "lm-eval", "transformers", "datasets", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        import datasets

        datasets.disable_progress_bars()
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def free(model) -> None:
    """Drop a reference to a model and give the device's cached memory back."""
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def now() -> float:
    """Seconds of a monotonic clock (perf_counter), for the rows' `seconds`."""
    return time.perf_counter()


def shorten(text: str, width: int = 100) -> str:
    """A reason on one line of at most `width` characters (the whole of it stays in eval.jsonl)."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def write_combination(eval_path: Path, rows: list[EvalRow]) -> None:
    """A combination's rows, appended and fsynced; where the file already holds rows of that combination (a
    failed attempt being run again), the file is rewritten without them, atomically (a kill leaves the old file
    or the new one), so that a rerun replaces its rows instead of adding a second set."""
    from hhbench.rows.schema import RowSet, append_row, read_rows

    combination = {(row.model, row.variant, row.task, row.context) for row in rows}
    old = read_rows(eval_path, kind=EvalRow) if eval_path.exists() else RowSet()
    if not any((row.model, row.variant, row.task, row.context) in combination for row in old):
        for row in rows:
            append_row(eval_path, row)
        return
    kept = RowSet(row for row in old if (row.model, row.variant, row.task, row.context) not in combination)
    RowSet([*kept, *rows]).to_jsonl(eval_path)


def check_lengths(tasks: list[TaskRef], lengths: list[int], tokenizer, limit: int, seed: int, chat: bool) -> None:
    """A length below what one of hhbench's tasks needs for its fixed text (instruction, needles, question, answer
    prefix, chat template) is refused, naming the minimum, before anything is evaluated."""
    for task in (t for t in tasks if t.own):
        for length in lengths:
            need = generators.fixed_tokens(task.name, tokenizer, length, limit, seed, chat)
            if need > length:
                raise UserError(
                    f"length {length} is too short for {task.name}: its fixed text (instruction, needles, question"
                    f"{', chat template' if chat else ''}) takes {need} tokens; use at least {need}"
                )


def run_eval(
    loaded: LoadedModel,
    variants: list[Variant],
    tasks: list[TaskRef],
    lengths: list[int],
    settings: EvalSettings,
    eval_path: Path,
    echo=print,
) -> None:
    """Every (task, length, variant) not yet in eval_path, task by task so that a stopped run leaves whole
    comparison rows; each finished combination's rows are appended (and fsynced) at once."""
    from hhbench.rows.schema import read_rows

    done = done_keys(read_rows(eval_path, repair=True, kind=EvalRow), settings) if eval_path.exists() else set()
    builder = VariantModels(loaded, settings)
    settings.extra.update(n_layers=loaded.shape.n_layers, n_heads=loaded.shape.n_heads)
    max_length = max(lengths) + 256
    for task in tasks:
        for length in lengths:
            for variant in variants:
                if (variant.label, task.name, length) in done:
                    echo(f"skip {variant.label} {task.name} {length}: in {eval_path}")
                    continue
                start = now()
                model, plan = builder.build(variant)
                # Converted models take no padding (GDN heads run over every position): batch size 1.
                batch = settings.batch_size if model is loaded.model else 1
                error, result = "", None
                try:
                    lm = hflm(model, loaded, batch, settings.device, max_length)
                    result = evaluate_task(lm, task, length, settings, loaded.tokenizer_dir)
                except torch.OutOfMemoryError as exc:
                    error = f"out of memory: {str(exc).splitlines()[0]}"
                except Exception as exc:  # one failed combination is a row with its reason; the run goes on
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                seconds = now() - start
                student = getattr(model, "hhbench_student", None)
                rows = eval_rows(
                    variant, plan, task, length, settings, result, error, seconds, settings.device, student
                )
                write_combination(eval_path, rows)
                primary = next((r for r in rows if r.metric == generators.primary_metric(task.name)), rows[0])
                shown = f"{primary.value:.3f}" if primary.value is not None else primary.status
                why = f": {shorten(primary.reason)}" if primary.reason else ""
                echo(
                    f"{variant.label:>20} {task.name:>14} {length:>6}: {primary.metric}={shown} ({seconds:.0f} s){why}"
                )
                if model is not loaded.model:
                    free(model)
