"""`hhbench distill` on a tiny random Llama (CPU): both losses fall, a 0:1 student is the teacher, a resumed run
equals an uninterrupted one bit for bit, two gloo ranks equal one process, the training stream holds no
evaluation template, bad input is one line, and a student evaluates."""

import ast
import copy
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hhbench.cli.app import main
from hhbench.distill import checkpoint, data, stages
from hhbench.distill.recipe import Recipe, load_recipe
from hhbench.distill.train import TRAIN, Job, read_train_rows, train
from hhbench.eval.harness import EvalSettings, VariantModels
from hhbench.models.loader import load_model
from hhbench.models.variants import parse_variant, parse_variants

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # a shared 2-core machine: spinning OpenMP threads slow steps 20x


@pytest.fixture(scope="module")
def teacher():
    return load_model("tiny-random-llama")


def recipe(**changes) -> Recipe:
    base = dict(model="tiny-random-llama", variants=("head:3:1",), head_map="", data=(), data_tokens=0,
                retrieval_ratio=1.0, chat=False, seq=128, batch=2, stage1_tokens=6 * 256, stage2_tokens=6 * 256,
                lr_new=1e-3, lr_attn=1e-4, train_attn=False, schedule="cosine", warmup=0.1, min_lr_ratio=0.1,
                weight_decay=0.0, betas=(0.9, 0.95), grad_clip=1.0, answer_weight=50.0, answer_ce=0.0, seed=0,
                dtype="fp32", init={})  # fmt: skip
    return Recipe(**{**base, **changes})


def job(teacher, tmp_path, rec, **kwargs) -> Job:
    stream = data.TokenStream(teacher.tokenizer, rec.seq, rec.seed, rec.retrieval_ratio, [], rec.chat)
    kwargs.setdefault("echo", lambda *_: None)
    return Job(rec, teacher, stream, tmp_path, torch.device("cpu"), gdn_backend="torch-recurrent", log_every=1,
               **kwargs)  # fmt: skip


def curve(path: Path, kind: str = "step") -> dict:
    return {
        (r["variant"], r["stage"], r["step"]): r["loss"] for r in read_train_rows(path / TRAIN) if r["kind"] == kind
    }


def test_both_stage_losses_fall_over_30_steps(teacher, tmp_path):
    rec = recipe(stage1_tokens=30 * 256, stage2_tokens=30 * 256, warmup=0.0, lr_new=1e-2)
    train(job(teacher, tmp_path, rec), parse_variants(["head:3:1"]))
    losses = curve(tmp_path)
    for stage in (1, 2):
        values = [losses[("head:3:1", stage, step)] for step in range(1, 31)]
        assert sum(values[-5:]) < 0.9 * sum(values[:5]), (stage, values)
    meta = checkpoint.read_meta(tmp_path, "head:3:1")
    assert meta["stage"] == 2 and meta["tokens"] == 60 * 256 and meta["recipe"]["answer_weight"] == 50.0
    stage_rows = [r for r in read_train_rows(tmp_path / TRAIN) if r["kind"] == "stage"]
    assert {r["stage"] for r in stage_rows} == {1, 2} and all(r["tokens_per_s"] > 0 for r in stage_rows)
    assert all(r["extra"]["first_step_s"] > 0 and r["extra"]["tokens_per_s_with_first_step"] > 0 for r in stage_rows)


def test_a_0_1_student_is_the_teacher_with_zero_loss(teacher, tmp_path):
    ids, answer = data.TokenStream(teacher.tokenizer, 128, 0, 1.0, [], False).batch(0, 2)
    student = copy.deepcopy(teacher.model)  # 0:1 converts nothing
    total, count = stages.alignment_loss(student, teacher.model, ids)
    kl, nll, weight, answers = stages.distillation_loss(student, teacher.model, ids, answer, 50.0)
    assert float(total) == 0.0 and float(kl) == 0.0 and weight > answers > 0
    train(job(teacher, tmp_path, recipe()), parse_variants(["head:0:1"]))
    (row,) = read_train_rows(tmp_path / TRAIN)
    assert row["status"] == "skipped"


def test_train_attn_keeps_the_fa_heads_the_teachers(teacher, tmp_path):
    rec = recipe(stage1_tokens=0, stage2_tokens=2 * 256, train_attn=True, lr_attn=1e-2)
    train(job(teacher, tmp_path, rec), parse_variants(["head:3:1"]))
    student = checkpoint.load_student(tmp_path, "head:3:1", teacher, gdn_backend="torch-recurrent")
    hydra = student.model.layers[0].self_attn.attn
    original = teacher.model.model.layers[0].self_attn
    d, fa, la = hydra.head_dim, hydra.split.fa_heads[0], hydra.split.la_heads[0]
    q = hydra.qkv.weight[: hydra.n_heads * d]
    assert torch.equal(q[fa * d : (fa + 1) * d], original.q_proj.weight[fa * d : (fa + 1) * d])
    assert not torch.equal(q[la * d : (la + 1) * d], original.q_proj.weight[la * d : (la + 1) * d])
    assert torch.equal(hydra.o_proj.weight[:, fa * d : (fa + 1) * d], original.o_proj.weight[:, fa * d : (fa + 1) * d])


def test_resume_equals_an_uninterrupted_run(teacher, tmp_path):
    rec = recipe()
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(job(teacher, whole, rec, checkpoint_every=2), parse_variants(["head:3:1"]))
    train(job(teacher, parts, rec, checkpoint_every=2, stop_after=4), parse_variants(["head:3:1"]))
    assert checkpoint.read_meta(parts, "head:3:1")["step"] == 4
    train(job(teacher, parts, rec, checkpoint_every=2), parse_variants(["head:3:1"]))
    assert curve(parts) == curve(whole) and len(curve(whole)) == 12
    from safetensors.torch import load_file

    a, b = (load_file(str(checkpoint.variant_dir(p, "head:3:1") / checkpoint.WEIGHTS)) for p in (whole, parts))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_logs_each_step_once(teacher, tmp_path, monkeypatch):
    rec = recipe()
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(job(teacher, whole, rec, checkpoint_every=2), parse_variants(["head:3:1", "layer:3:1"]))
    log = Job.log

    def interrupted(self, row):  # Ctrl-C once head:3:1 logged stage 2 step 3: its checkpoint is at step 2
        log(self, row)
        if (row.variant, row.stage, row.step) == ("head:3:1", 2, 3):
            raise KeyboardInterrupt

    monkeypatch.setattr(Job, "log", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(job(teacher, parts, rec, checkpoint_every=2), parse_variants(["head:3:1", "layer:3:1"]))
    with open(parts / TRAIN, "a") as out:
        out.write('{"variant": "head:3:1", "st')  # a row cut short by the kill
    monkeypatch.setattr(Job, "log", log)
    train(job(teacher, parts, rec, checkpoint_every=2), parse_variants(["head:3:1", "layer:3:1"]))

    def keys(path: Path) -> list[tuple]:
        found = []
        for line in (path / TRAIN).read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                found.append(("not a row", line))
                continue
            found.append((row["variant"], row["stage"], row["step"], row["kind"]))
        return found

    assert keys(parts) == keys(whole) and len(keys(whole)) == 2 * (12 + 2)
    assert curve(parts) == curve(whole)


def test_a_save_that_fails_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A checkpoint save whose writer raises (a full disk, Ctrl-C) leaves the previous checkpoint and no temporary."""
    model = torch.nn.Linear(2, 2)
    folder = checkpoint.save(tmp_path, "head:3:1", model, ["weight"], {"step": 1}, {"step": 1})
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    def full(tensors, path, metadata):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(tmp_path, "head:3:1", model, ["weight"], {"step": 2}, {"step": 2})
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_a_nan_loss_stops_that_variant_only(teacher, tmp_path, monkeypatch):
    build = VariantModels.build

    def poisoned(self, variant):
        model, plan = build(self, variant)
        if variant.label == "head:3:1":
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if n.endswith("head_gamma")).fill_(float("nan"))
        return model, plan

    monkeypatch.setattr(VariantModels, "build", poisoned)
    train(
        job(teacher, tmp_path, recipe(stage1_tokens=512, stage2_tokens=512)), parse_variants(["head:3:1", "layer:3:1"])
    )
    rows = read_train_rows(tmp_path / TRAIN)
    bad = [r for r in rows if r["variant"] == "head:3:1"]
    assert len(bad) == 1 and bad[0]["status"] == "error" and "loss is nan" in bad[0]["reason"]
    assert {r["stage"] for r in rows if r["variant"] == "layer:3:1" and r["kind"] == "stage"} == {1, 2}


def _eval_template_fragments() -> set[str]:
    """Every fixed piece (12+ characters, split at format fields) of the string constants of the eval generators,
    the lm-eval suite and the head-selection probes."""
    sources = [ROOT / "hhbench/eval/generators.py", ROOT / "hhbench/select/probes.py",
               *(ROOT / "suites/lm_eval").glob("*.py")]  # fmt: skip
    strings = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.append(node.value)
    for path in (ROOT / "suites/lm_eval").glob("*.yaml"):
        strings += re.findall(r'"([^"]+)"', path.read_text())
    fragments = set()
    for text in strings:
        for piece in re.split(r"\{[^}]*\}", text):
            piece = piece.strip()
            if len(piece) >= 12 and " " in piece:
                fragments.add(piece.lower())
    return fragments


def test_no_eval_template_in_the_training_stream(teacher):
    fragments = _eval_template_fragments()
    assert any("the pass key is" in f for f in fragments)  # the check reads the eval templates
    stream = data.TokenStream(teacher.tokenizer, 2048, 0, 1.0, [], False)
    ids, answer = stream.batch(0, 40)
    text = teacher.tokenizer.decode(ids.reshape(-1)).lower()
    assert all(word in text for word in ("locker", "crate", "register entry", "slot"))  # every kind occurs
    found = [f for f in fragments if f in text]
    assert not found, found
    assert answer.any(dim=1).all()  # every generated document has answer positions
    first = ids[0][answer[0]].tolist()
    assert teacher.tokenizer.decode(first).strip().replace(", ", "").isalnum()


def test_sequences_start_as_evaluated_prompts_do(tmp_path):
    from hhbench.models.loader import char_tokenizer
    from hhbench.models.tokens import encode

    tokenizer = char_tokenizer(tmp_path, add_bos=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = data.RetrievalStream(tokenizer, 128, chat=False)
    for seed in range(8):
        made = stream.sequence(random.Random(seed))
        assert len(made.ids) == 129 and made.ids[0] == bos and made.ids.count(bos) == 1 and made.ids[-1] == eos
        # the document, less its EOS, is what the evaluation's tokenization of its text gives
        assert made.ids[:-1] == encode(tokenizer, tokenizer.decode(made.ids[1:-1]))
        marked = [i for i, answer in enumerate(made.answer) if answer]
        assert marked == list(range(marked[0], 128)), marked  # one run of tokens, up to the EOS
        answer = tokenizer.decode([made.ids[i] for i in marked])
        assert tokenizer.decode(made.ids[marked[0] - 1]) in (":", ">")
        assert re.fullmatch(r" (\d{4,8}|[a-z]+\d+(, [a-z]+\d+)*)", answer), answer
    stream = data.TokenStream(tokenizer, 128, 0, 0.5, ["x" * 100, "y" * 100], chat=False)
    x, y = tokenizer.convert_tokens_to_ids(["x", "y"])
    assert stream.corpus.tolist() == [bos, *[x] * 100, eos, bos, *[y] * 100, eos]


def test_two_gloo_ranks_equal_one_process(tmp_path, teacher):
    args = ["distill", "--model", "tiny-random-llama", "--variants", "head:3:1", "--stage1-tokens", "1k",
            "--stage2-tokens", "1k", "--seq", "128", "--batch", "4", "--log-every", "1", "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29517", "-m", "hhbench", *args, "--run-name", "two"], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = tmp_path / "one"
    train(job(teacher, one, load_recipe(tmp_path / "two")), parse_variants(["head:3:1"]))  # the same recipe, 1 rank
    a, b = curve(one), curve(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 4
    stage_rows = [r for r in read_train_rows(tmp_path / "two" / TRAIN) if r["kind"] == "stage"]
    assert [r["extra"]["data_parallel_ranks"] for r in stage_rows] == [2, 2]  # each rank took half of each batch
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def one_line(capsys, argv: list[str], text: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and text in err[0], err


def test_bad_input_is_one_line(capsys, tmp_path):
    base = ["distill", "--model", "tiny-random-llama", "--seq", "128", "--stage1-tokens", "1k", "--stage2-tokens",
            "1k", "--batch", "2", "--out", str(tmp_path)]  # fmt: skip
    one_line(capsys, [*base, "--variants", "head:7"], "bad variant")
    one_line(capsys, [*base, "--variants", "head:7:1:selected"], "needs --head-map")
    one_line(capsys, [*base, "--variants", "head:3:1", "--data", str(tmp_path / "none.txt")], "no data at")
    (tmp_path / "empty.jsonl").write_text("\n")
    one_line(capsys, [*base, "--variants", "head:3:1", "--data", str(tmp_path / "empty.jsonl")], "holds no text")
    one_line(capsys, [*base, "--variants", "head:3:1", "--seq", "9000"], "exceeds tiny-random-llama's 8192 positions")
    one_line(capsys, [*base, "--variants", "head:3:1", "--stage1-tokens", "0", "--stage2-tokens", "0"], "zero tokens")
    for nothing in ("teacher", "layer:3:1,head:0:1"):  # no linear-attention head: nothing to train
        one_line(capsys, [*base, "--variants", nothing, "--run", "t"], "converts no attention head")
    # a decode-only backend: training raised NotImplementedError with a traceback after making the run folder
    one_line(capsys, [*base, "--variants", "head:3:1", "--fa-backend", "sdpa-split", "--run", "t"],
             "backend sdpa-split cannot run the train pass here: sdpa-split does not implement the train pass")  # fmt: skip
    assert not (tmp_path / "t").exists()
    for flag in ("--run", "--run-name"):  # a run stays inside --out; "" (an unset variable) is no default run
        for name in ("../esc", ""):
            one_line(capsys, [*base, "--variants", "head:3:1", flag, name], f"bad run name {name!r}")
    assert not (tmp_path.parent / "esc").exists() and not (tmp_path / "distill-tiny-random-llama").exists()
    assert main_ok(capsys, [*base, "--variants", "layer:3:1", "--run", "r", "--stop-after", "1"])
    one_line(capsys, [*base, "--variants", "layer:3:1", "--run", "r", "--lr-new", "0.01"], "another recipe")


def test_a_refused_command_writes_nothing_and_the_corrected_one_runs(capsys, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from hhbench.models.loader import char_tokenizer

    folder = tmp_path / "windowed"
    char_tokenizer(folder)
    config = MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=8, sliding_window=8)  # fmt: skip
    MistralForCausalLM(config).save_pretrained(folder)
    capsys.readouterr()  # save_pretrained's progress bar
    base = ["distill", "--model", str(folder), "--seq", "128", "--stage1-tokens", "256", "--stage2-tokens", "0",
            "--batch", "2", "--out", str(tmp_path), "--run", "w"]  # fmt: skip
    one_line(capsys, [*base, "--variants", "head:3:1"], "sliding-window attention")
    one_line(capsys, [*base, "--variants", "layer:3:1", "--fa-backend", "bogus"], "unknown FA backend")
    assert not (tmp_path / "w").exists()
    assert main_ok(capsys, [*base, "--variants", "layer:3:1"])


TINY_DISTILL = ["distill", "--model", "tiny-random-llama", "--variants", "layer:3:1", "--seq", "128", "--batch", "2",
                "--stage1-tokens", "256", "--stage2-tokens", "0", "--run", "d"]  # fmt: skip


def test_a_second_distill_into_a_running_run_is_refused(capsys, tmp_path):
    from hhbench.launch.lock import run_lock
    from hhbench.rows.runs import RunDir

    args = [*TINY_DISTILL, "--out", str(tmp_path)]
    with run_lock(RunDir(tmp_path / "d")):  # a distill (or sweep) still writing the run
        one_line(capsys, args, f"run {tmp_path / 'd'} is being written by another")
    assert not (tmp_path / "d" / TRAIN).exists()
    assert main_ok(capsys, args)  # once it has finished


def test_the_printed_eval_command_evaluates_the_students(capsys, tmp_path):
    import shlex

    import typer

    from hhbench.cli.app import app

    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_:
        main([*TINY_DISTILL, "--variants", "head:3:1,layer:3:1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert exit_.value.code == 0
    argv = shlex.split(printed.split("evaluate with: ", 1)[1])
    assert argv[:2] == ["hhbench", "eval"]
    ctx = typer.main.get_command(app).get_command(None, "eval").make_context("eval", argv[2:])
    assert ctx.params["model"] == "tiny-random-llama" and ctx.params["variants"] == ",".join(
        f"{v}@{out / 'd'}" for v in ("head:3:1", "layer:3:1")
    )
    assert (ctx.params["out"], ctx.params["run"]) == (str(out), "d")  # the distillation's own run folder


def main_ok(capsys, argv: list[str]) -> bool:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    capsys.readouterr()
    return exit_.value.code == 0


def test_cli_distills_two_variants_and_the_students_evaluate(cli, tmp_path, teacher, capsys):
    text = tmp_path / "text.jsonl"
    text.write_text(
        "\n".join(json.dumps({"text": f"Line {i}: plain prose about kettles and kites."}) for i in range(200))
    )
    result = cli("distill", "--model", "tiny-random-llama", "--variants", "head:3:1,layer:3:1", "--stage1-tokens",
                 "20k", "--stage2-tokens", "20k", "--seq", "128", "--data", str(text), "--out", str(tmp_path),
                 "--run", "d", timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr
    run = tmp_path / "d"
    assert json.loads((run / "recipe.json").read_text())["variants"] == ["head:3:1", "layer:3:1"]
    assert (run / "env.json").exists() and "mixed with the generated retrieval stream" in result.stdout
    rows = read_train_rows(run / TRAIN)
    assert {(r["variant"], r["stage"]) for r in rows if r["kind"] == "stage"} == {
        (v, s) for v in ("head:3:1", "layer:3:1") for s in (1, 2)
    }
    assert {"variant", "stage", "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    # the student as `hhbench eval` builds it is the trained model
    variant = parse_variant(f"head:3:1@{run}")
    assert variant.label == "head:3:1@d" and variant.base_label == "head:3:1"
    model, plan = VariantModels(teacher, EvalSettings(model="x", limit=0, gdn_backend="torch-recurrent")).build(variant)
    assert model.hhbench_student["tokens_trained"] == 2 * 10 * 16 * 128
    fresh, _ = VariantModels(teacher, EvalSettings(model="x", limit=0)).build(parse_variant("head:3:1"))
    gammas = [(n, p) for n, p in model.named_parameters() if n.endswith("head_gamma")]
    assert any(not torch.equal(p, dict(fresh.named_parameters())[n]) for n, p in gammas)
    ev = cli("eval", "--model", "tiny-random-llama", "--variants", f"layer:3:1,layer:3:1@{run}", "--tasks", "passkey",
             "--lengths", "384", "--limit", "2", "--out", str(tmp_path), "--run", "d", timeout=240, env=ONE_THREAD)  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    (student,) = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines() if "@d" in line]
    assert student["status"] == "ok" and student["extra"]["tokens_trained"] == 2 * 10 * 16 * 128
    assert "layer:3:1@d" in ev.stdout
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["table", str(run)])
    table = capsys.readouterr().out
    assert exit_.value.code == 0 and "layer:3:1@d" in table and "Wilson's" in table
    assert re.search(r"\| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", table)  # the pass rates' intervals, from k of n
    from hhbench.report.page import build_report
    from hhbench.rows.sources import load_runs

    page = build_report(load_runs([run]))
    assert {f.slug for f in page.figures} >= {"training", "quality"}
