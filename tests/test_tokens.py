"""One special-token convention everywhere, the tokenizer's own as lm-eval applies it: evaluated prompts, the task
generators' lengths, head-selection probes and gamma calibration, with a tokenizer that adds BOS (Llama's) and
one that adds none."""

from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

from inprocess import run_main  # noqa: E402

from hhbench.errors import UserError  # noqa: E402
from hhbench.eval import generators  # noqa: E402
from hhbench.eval.harness import calibration_ids  # noqa: E402
from hhbench.models import loader  # noqa: E402
from hhbench.models.tokens import encode, special_prefix  # noqa: E402
from hhbench.select.probes import NEEDLE, make_probes  # noqa: E402

BOS = 1


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory):
    return loader.char_tokenizer(tmp_path_factory.mktemp("bos"), add_bos=True)


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    return loader.char_tokenizer(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def lm(bos_tok):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=loader.tiny_llama(len(bos_tok), layers=1), tokenizer=bos_tok, batch_size=1, device="cpu")


def test_encode_adds_what_the_tokenizer_adds_once(bos_tok, plain_tok):
    assert encode(bos_tok, "ab") == [BOS, *bos_tok("ab", add_special_tokens=False)["input_ids"]]
    assert encode(bos_tok, "<s>ab") == encode(bos_tok, "ab")  # a template that writes BOS gets no second one
    assert encode(plain_tok, "ab") == plain_tok("ab", add_special_tokens=False)["input_ids"]
    assert special_prefix(bos_tok) == [BOS] and special_prefix(plain_tok) == []


@pytest.mark.parametrize("task", ["passkey", "niah_multikey", "vt"])
def test_prompts_are_counted_as_lm_eval_encodes_them(bos_tok, lm, task):
    for doc in generators.generate(task, bos_tok, 700, 3, seed=0):
        ids = lm.tok_encode(doc["input"])
        batch = lm.tok_batch_encode([doc["input"]])[0][0].tolist()
        assert ids[0] == BOS and ids == batch == encode(bos_tok, doc["input"])
        assert doc["length"] == len(ids) <= 700  # BOS included: the prompt fits as the model sees it
    for doc in generators.generate("passkey_ll", bos_tok, 300, 2, seed=0):  # continuations carry no BOS
        assert doc["answer_tokens"] == len(doc["continuation"])


def test_probes_start_with_the_tokenizers_prefix(bos_tok, plain_tok):
    piece = lambda tok: lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    with_bos = make_probes(piece(bos_tok), [500, 600], 2, seed=0, prefix=special_prefix(bos_tok))
    without = make_probes(piece(plain_tok), [500, 600], 2, seed=0, prefix=special_prefix(plain_tok))
    for probe, plain in zip(with_bos, without, strict=True):
        assert probe.clean[0] == probe.corrupt[0] == BOS and plain.clean[0] != BOS
        assert len(probe.clean) <= probe.length and probe.clean[1:100] == plain.clean[:99]  # the same intro after BOS
        start, end = probe.needle
        assert bos_tok.decode(probe.clean[start:end]).startswith(NEEDLE.split("{")[0])
        # the whole prompt encodes to the probe's ids: pieces and prefix agree with the convention
        text = bos_tok.decode(probe.clean[1 : probe.prompt_len])
        assert encode(bos_tok, text) == list(probe.clean[: probe.prompt_len])


def test_calibration_tokens_start_as_evaluated_prompts_do(bos_tok, plain_tok):
    ids = calibration_ids(SimpleNamespace(tokenizer=bos_tok), length=64)
    assert ids.shape == (1, 64) and ids[0, 0].item() == BOS
    assert calibration_ids(SimpleNamespace(tokenizer=plain_tok), length=64)[0, 0].item() != BOS


def test_select_heads_probes_a_bos_model_with_bos(tmp_path, bos_tok, monkeypatch):
    from hhbench.select import scores

    folder = tmp_path / "llama-bos"
    loader.tiny_llama(len(bos_tok), layers=2).save_pretrained(folder)
    bos_tok.save_pretrained(folder)
    seen = []

    def capture(model, probes, advance):
        seen.extend(probes)
        raise UserError("captured")

    monkeypatch.setattr(scores, "score_model", capture)
    result = run_main("select-heads", "--model", str(folder), "--lengths", "500", "--probes", "2", "--device", "cpu",
                      "--out", str(tmp_path / "h.json"))  # fmt: skip
    assert "captured" in result.stderr and len(seen) == 2
    assert all(probe.clean[0] == BOS and probe.clean[1] != BOS for probe in seen)
