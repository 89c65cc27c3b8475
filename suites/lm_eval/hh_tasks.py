"""lm-eval hooks of hhbench's long-context tasks: the dataset makers (`custom_dataset`) and the scorer.

lm-eval calls a task's `custom_dataset` with the TaskManager's metadata, which `hhbench eval` sets to
{"tokenizer": a local tokenizer folder, "max_seq_lengths": [length], "hh_samples": N, "hh_seed": S,
"hh_chat": true|false}; the docs come from hhbench.eval.generators (deterministic, offline)."""

import datasets

from hhbench.eval import generators


def _dataset(task: str, **meta) -> dict:
    from transformers import AutoTokenizer

    tokenizer = meta.get("tokenizer")
    if not tokenizer:
        raise ValueError(f"hh_{task} needs metadata 'tokenizer': a local tokenizer folder")
    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    docs = []
    for length in meta.get("max_seq_lengths") or [4096]:
        docs += generators.generate(
            task,
            tok,
            int(length),
            int(meta.get("hh_samples", 50)),
            int(meta.get("hh_seed", 0)),
            bool(meta.get("hh_chat", False)),
        )
    return {"test": datasets.Dataset.from_list(docs)}


def passkey(**meta):
    return _dataset("passkey", **meta)


def niah_single(**meta):
    return _dataset("niah_single", **meta)


def niah_multikey(**meta):
    return _dataset("niah_multikey", **meta)


def vt(**meta):
    return _dataset("vt", **meta)


def copy(**meta):
    return _dataset("copy", **meta)


def process_results(doc: dict, results: list[str]) -> dict:
    return generators.score(doc["task"], results[0], doc["outputs"])


def passkey_ll(**meta):
    return _dataset("passkey_ll", **meta)


def niah_single_ll(**meta):
    return _dataset("niah_single_ll", **meta)


def real_prompt(doc: dict) -> int:
    """The index of the real prompt among the two contexts (lm-eval's multiple-input form)."""
    return 0


def prompts(doc: dict) -> list[str]:
    return [doc["input"], doc["control"]]


def process_results_ll(doc: dict, results: list) -> dict:
    real, control = results
    return generators.score_loglikelihood(doc, real, control)
