"""The training token stream: windows of real text (`--data PATH...`, plain text or .jsonl with a "text" field)
mixed with a generated retrieval stream, each sequence with an answer mask.

The retrieval stream has templates, names and filler of its own (a logbook of lockers, crates, couriers and
registers), disjoint from the evaluation generators (hhbench.eval.generators, suites/lm_eval,
hhbench.select.probes): training must not teach the test's wording. Four kinds of document, as RULER's families:
- single: one fact in filler, asked at the end;
- multi: several facts of different names, one asked;
- kv: a table of key -> value entries, one key looked up;
- chain: variable tracking, `slot X holds N`, `slot Y copies slot X`, ...; every slot holding N is the answer.

Special tokens follow the evaluation's convention (hhbench.models.tokens): a retrieval document starts with the
special tokens `encode` puts before its whole text, as an evaluated prompt does (BOS for tokenizers that add it,
none where a chat template writes BOS itself); each text document is encoded the same way and followed by EOS,
so the corpus windows see a document's start as the model sees a prompt's start.

Sequence i of a run is a pure function of (seed, i): every variant sees the same stream in the same order, a
resumed run continues where it stopped, and data-parallel ranks each take their slice of the same global batch.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from hhbench.errors import UserError
from hhbench.models.tokens import special_prefix, writes_bos

KINDS = ("single", "multi", "kv", "chain")

# Filler: a harbor-master's logbook, built from parts so that sentences rarely repeat.
CREW = ("the night clerk", "a deckhand", "the quartermaster", "our cooper", "the ferryman", "a surveyor",
        "the lamp keeper", "two porters", "the tally man", "a rope maker", "the pilot's mate", "the customs officer")  # fmt: skip
DEEDS = ("weighed", "stacked", "logged", "inspected", "tarred", "hauled", "unloaded", "sealed", "patched",
         "recounted", "stowed", "signed for")  # fmt: skip
CARGO = ("sacks of rye", "barrels of pitch", "a crate of tin plates", "coils of hemp", "bolts of linen",
         "casks of cider", "a pallet of slate", "bales of wool", "jars of lamp oil", "a chest of nails",
         "bundles of oak staves", "tins of salted fish")  # fmt: skip
WHEN = ("at first bell", "ahead of the tide", "while the fog lifted", "under a grey drizzle", "past midnight",
        "before the gulls woke", "at the turn of the watch", "by lantern light", "once the wind dropped",
        "after the noon whistle")  # fmt: skip
ASIDES = ("Gulls circled over the breakwater.", "Somebody left the chart room door ajar again.",
          "Tar smells stronger when the air is damp.", "The tide tables were pinned beside the stove.",
          "Nobody trusted the third crane after its chain slipped.", "Coffee ran out before the second shift.")  # fmt: skip
TAGS = ("amber ledger bramble cobalt dune ember fennel gravel hollow indigo juniper kelp lichen mortar nettle "
        "onyx pewter quill russet sorrel tallow umber vellum wicker yarrow zinc").split()  # fmt: skip

INTROS = ("Logbook extract follows; keep track of every figure in it.",
          "Read these harbor notes and remember the numbers they record.")  # fmt: skip


def _filler_sentence(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return rng.choice(ASIDES)
    text = f"{rng.choice(CREW)} {rng.choice(DEEDS)} {rng.choice(CARGO)} {rng.choice(WHEN)}."
    return text[0].upper() + text[1:]


def _name(rng: random.Random) -> str:
    return f"{rng.choice(TAGS)}{rng.randint(2, 99)}"


def _digits(rng: random.Random) -> str:
    """A number of 4 to 8 digits (the evaluations ask for 5 and 7)."""
    digits = rng.randint(4, 8)
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


@dataclass(frozen=True)
class Example:
    """One retrieval document's text parts: facts go among the filler at random depths; the answer follows the
    question's prefix."""

    facts: tuple[str, ...]
    question: str
    prefix: str
    answer: str


def make_example(kind: str, rng: random.Random, facts: int) -> Example:
    """A document of `kind` with up to `facts` facts (fewer where a kind needs fewer)."""
    names: list[str] = []
    while len(names) < max(facts, 1):
        name = _name(rng)
        if name not in names:
            names.append(name)
    values = [_digits(rng) for _ in names]
    if kind == "single":
        return Example((f"Locker {names[0]} opens with code {values[0]}.",),
                       f"Which code opens locker {names[0]}?", f"Locker {names[0]} code:", values[0])  # fmt: skip
    if kind == "multi":
        asked = rng.randrange(len(names))
        facts_ = tuple(f"Crate {n} was tagged with manifest {v}." for n, v in zip(names, values, strict=True))
        return Example(facts_, f"Which manifest did crate {names[asked]} carry?", f"Crate {names[asked]} manifest:",
                       values[asked])  # fmt: skip
    if kind == "kv":
        asked = rng.randrange(len(names))
        table = " ".join(f"{n} => {v};" for n, v in zip(names, values, strict=True))
        return Example((f"Register entries: {table}",), f"Look up register entry {names[asked]}.",
                       f"Entry {names[asked]} =>", values[asked])  # fmt: skip
    if kind == "chain":
        chain = [f"Slot {names[0]} holds {values[0]}."]
        chain += [f"Slot {names[i]} copies slot {names[i - 1]}." for i in range(1, len(names))]
        return Example(tuple(chain), f"Name every slot that ends up holding {values[0]}.",
                       f"Slots holding {values[0]}:", ", ".join(names))  # fmt: skip
    raise ValueError(f"unknown kind {kind}")


@dataclass
class Sequence:
    """One training sequence: seq + 1 token ids and, per id, whether it belongs to an answer."""

    ids: list[int]  # seq + 1 token ids (inputs are ids[:-1], next-token targets ids[1:])
    answer: list[bool]  # per id: part of an answer


class RetrievalStream:
    """Generated retrieval documents of exactly seq + 1 tokens, assembled from separately tokenized parts (the
    filler sentences are tokenized once, into a pool) after the special tokens an evaluated prompt starts with."""

    def __init__(self, tokenizer, seq: int, chat: bool, pool: int = 512):
        self.tokenizer, self.seq = tokenizer, seq
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        rng = random.Random("hhbench-distill-filler")
        self.pool = [self.encode(" " + _filler_sentence(rng)) for _ in range(pool)]
        self.user_prefix, self.user_suffix = "", "\n"
        if chat:  # the chat template's user turn around the document, as the model is evaluated
            marker = "\x00BODY\x00"
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
            )
            self.user_prefix, self.user_suffix = text.split(marker)
        self.start = [] if writes_bos(tokenizer, self.user_prefix) else special_prefix(tokenizer)
        if self._parts(make_example("single", random.Random(0), 1), intro="") is None:
            raise UserError(f"--seq {seq} is too short for a retrieval document: use at least 128 tokens")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _parts(self, example: Example, intro: str):
        head = self.start + self.encode(self.user_prefix + intro)
        facts = [self.encode(" " + fact) for fact in example.facts]
        tail = self.encode("\n\n" + example.question + self.user_suffix + example.prefix)
        answer = self.encode(" " + example.answer) + self.eos
        budget = self.seq + 1 - len(head) - sum(map(len, facts)) - len(tail) - len(answer)
        return (head, facts, tail, answer, budget) if budget >= 0 else None

    def sequence(self, rng: random.Random) -> Sequence:
        """One generated retrieval document of seq + 1 tokens (a random kind and fact count, as many as fit, filler
        from the pool), its answer tokens marked (EOS excluded)."""
        kind = rng.choice(KINDS)
        facts = {"single": 1, "multi": rng.randint(2, 6), "kv": rng.randint(4, 16), "chain": rng.randint(2, 5)}[kind]
        intro = rng.choice(INTROS)
        while True:  # as many facts as fit, then without the intro: short sequences in the tests
            parts = self._parts(make_example(kind, random.Random(rng.random()), facts), intro)
            if parts is not None:
                break
            if facts > 1:
                facts -= 1
            elif intro:
                intro = ""
            else:
                kind = "single"
        head, fact_ids, tail, answer, budget = parts
        filler: list[list[int]] = []
        used = 0
        while used < budget:
            sentence = self.pool[rng.randrange(len(self.pool))]
            filler.append(sentence[: budget - used])
            used += len(filler[-1])
        for fact in sorted(fact_ids, key=lambda _: rng.random()):  # facts in random order at random depths
            filler.insert(rng.randint(0, len(filler)), fact)
        body = [token for piece in filler for token in piece]
        ids = head + body + tail + answer
        mask = [False] * (len(ids) - len(answer)) + [True] * (len(answer) - len(self.eos)) + [False] * len(self.eos)
        return Sequence(ids, mask)


def read_texts(paths: list[str]) -> list[str]:
    """The documents of text files: a .jsonl file gives each line's "text", any other file is one document.
    A missing or empty path is the user's error."""
    documents = []
    for name in paths:
        path = Path(name)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        if not path.exists():
            raise UserError(f"no data at {name}")
        found = 0
        for file in files:
            try:
                text = file.read_text(errors="replace")
            except OSError as exc:
                raise UserError(f"cannot read data {file}: {exc.strerror or exc}") from None
            if file.suffix == ".jsonl":
                for number, line in enumerate(text.splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(
                            f"data {file}:{number} is not JSON (a .jsonl file has one object a line)"
                        ) from None
                    if isinstance(record, dict) and isinstance(record.get("text"), str) and record["text"].strip():
                        documents.append(record["text"])
                        found += 1
            elif text.strip():
                documents.append(text)
                found += 1
        if not found:
            raise UserError(f"data {name} holds no text")
    return documents


class TokenStream:
    """Sequence i: with probability `retrieval_ratio` a generated retrieval document, else the i-th window of the
    text corpus (documents tokenized once, each as an evaluated prompt starts, BOS where the tokenizer adds it,
    and followed by EOS). Batches are [B, seq + 1] ids and answer masks."""

    def __init__(self, tokenizer, seq: int, seed: int, retrieval_ratio: float, texts: list[str], chat: bool):
        self.seq, self.seed = seq, seed
        self.retrieval_ratio = retrieval_ratio if texts else 1.0
        self.retrieval = RetrievalStream(tokenizer, seq, chat)
        self.corpus = None
        if texts:
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            start = special_prefix(tokenizer)
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
            documents = [[*([] if writes_bos(tokenizer, text) else start), *ids, *eos]
                         for text, ids in zip(texts, encoded, strict=True)]  # fmt: skip
            self.corpus = torch.tensor([t for ids in documents for t in ids], dtype=torch.long)
            if len(self.corpus) < seq + 1:
                raise UserError(f"--data holds {len(self.corpus)} tokens, fewer than one sequence of {seq + 1}")

    def sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence `index` (deterministic in seed and index): (ids [seq + 1], answer mask [seq + 1]), a retrieval
        document or a window of the corpus (no answer tokens)."""
        rng = random.Random(f"hhbench-distill:{self.seed}:{index}")
        if self.corpus is None or rng.random() < self.retrieval_ratio:
            made = self.retrieval.sequence(rng)
            return torch.tensor(made.ids), torch.tensor(made.answer)
        windows = max(1, len(self.corpus) - self.seq)
        start = (index * (self.seq + 1)) % windows
        return self.corpus[start : start + self.seq + 1], torch.zeros(self.seq + 1, dtype=torch.bool)

    def batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences first .. first + size - 1: ids [size, seq + 1] (long) and answer mask [size, seq + 1]."""
        pairs = [self.sequence(first + j) for j in range(size)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
