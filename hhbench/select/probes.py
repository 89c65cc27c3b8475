"""Needle-in-a-haystack probes for head selection, with counterfactual twins.

One probe is a RULER-style single needle ("The special magic number for KEY is: VALUE.") at some depth of a
digit-free haystack, then the question, then the answer VALUE (teacher-forced). Its twin has the same haystack,
key and depth and a different VALUE (first digit differs, same token count), in the needle and in the answer,
so that the two differ only where the needle value is. Prompts are built from separately encoded segments, so
every position is known exactly and the clean and counterfactual token sequences align one to one; both start
with the special tokens the tokenizer puts before a prompt (BOS for Llama's), as the evaluated prompts do.
Deterministic for a seed: each probe draws from its own random.Random seeded by (seed, length, index).
"""

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hhbench.errors import UserError

Encode = Callable[[str], list[int]]

INTRO = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.\n"
)
NEEDLE = " The special magic number for {key} is:"
VALUE = " {value}"
NEEDLE_END = "."
QUESTION = (
    "\nWhat is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is:"
)
# Digit-free and colon-free, so that the needle is the only place a value can be copied from.
FILLER = (
    " The grass is green and the sky is blue.",
    " A river runs past the old mill at the edge of the town.",
    " Most people who start a company underestimate how long it takes.",
    " The library closes early on the last day of every month.",
    " Good writing is mostly a matter of rewriting what you have.",
    " The train was late again, so everyone waited on the platform.",
    " Small teams often move faster than large ones.",
    " She planted tomatoes, beans and a row of sunflowers in the garden.",
    " The museum keeps its oldest maps in a cool and dark room.",
    " There is no shortcut to learning a language well.",
    " The wind picked up in the evening and the boats came back in.",
    " He read the letter twice before he put it away.",
)
KEYS = ("apple", "river", "falcon", "copper", "lantern", "meadow", "violin", "harbor", "glacier", "orchid",
        "pepper", "canyon", "saddle", "marble", "thistle", "beacon")  # fmt: skip
VALUE_DIGITS = 7


@dataclass(frozen=True)
class Probe:
    """Token ids of a probe (prompt + answer) and of its counterfactual twin, with the spans that matter."""

    clean: tuple[int, ...]
    corrupt: tuple[int, ...]
    prompt_len: int  # the answer is clean[prompt_len:]
    needle: tuple[int, int]  # [start, end) of the needle sentence
    length: int  # the requested length in tokens
    depth: float  # where the needle sits, as a fraction of the haystack
    value: str
    counter_value: str

    @property
    def answer(self) -> tuple[int, ...]:
        """The answer's token ids: clean[prompt_len:]."""
        return self.clean[self.prompt_len :]

    @property
    def split(self) -> int:
        """The position that predicts the first answer token where the two values differ: patching happens
        here and the logit difference is read here. Everything before it is shared by the answers."""
        for i in range(self.prompt_len, len(self.clean)):
            if self.clean[i] != self.corrupt[i]:
                return i - 1
        raise AssertionError("a probe's answers must differ")


def _values(rng: random.Random) -> tuple[str, str]:
    value = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(VALUE_DIGITS - 1))
    first = rng.choice([d for d in "123456789" if d != value[0]])
    counter = first + "".join(str(rng.randint(0, 9)) for _ in range(VALUE_DIGITS - 1))
    return value, counter


def make_probe(encode: Encode, length: int, index: int, count: int, seed: int, prefix: Sequence[int] = ()) -> Probe:
    """Probe `index` of `count` at `length` tokens; `prefix` (the tokenizer's special tokens before a prompt, e.g.
    [BOS]: hhbench.models.tokens.special_prefix) starts both token sequences, as it starts evaluated prompts."""
    prefix = list(prefix)
    rng = random.Random(f"hhbench-niah:{seed}:{length}:{index}")
    key = rng.choice(KEYS)
    value, counter = _values(rng)
    intro, needle, end = encode(INTRO), encode(NEEDLE.format(key=key)), encode(NEEDLE_END)
    question = encode(QUESTION.format(key=key))
    value_ids, counter_ids = encode(VALUE.format(value=value)), encode(VALUE.format(value=counter))
    if len(value_ids) != len(counter_ids) or value_ids == counter_ids:
        raise UserError("the tokenizer encodes two needle values of the same digit count unequally")
    fixed = len(prefix) + len(intro) + len(needle) + 2 * len(value_ids) + len(end) + len(question)
    budget = length - fixed
    need = fixed + 2 * min(len(encode(s)) for s in FILLER)
    if length < need:
        raise UserError(f"probe length {length} is too short: a needle probe needs at least {need} tokens")
    order = list(range(len(FILLER)))
    rng.shuffle(order)
    filler: list[list[int]] = []
    used, k = 0, 0
    while True:
        sentence = encode(FILLER[order[k % len(order)]])
        if used + len(sentence) > budget:
            break
        filler.append(sentence)
        used += len(sentence)
        k += 1
    depth = 0.1 + 0.8 * (index + 0.5) / count  # needles spread evenly over 10%..90% of the haystack
    cut = round(depth * len(filler))
    before = [t for s in filler[:cut] for t in s]
    after = [t for s in filler[cut:] for t in s]
    start = len(prefix) + len(intro) + len(before)

    def build(ids: list[int]) -> tuple[int, ...]:
        return tuple(prefix + intro + before + needle + ids + end + after + question + ids)

    clean, corrupt = build(value_ids), build(counter_ids)
    prompt_len = len(clean) - len(value_ids)
    needle_span = (start, start + len(needle) + len(value_ids) + len(end))
    return Probe(clean, corrupt, prompt_len, needle_span, length, depth, value, counter)


def make_probes(
    encode: Encode, lengths: Sequence[int], per_length: int, seed: int, prefix: Sequence[int] = ()
) -> list[Probe]:
    """`per_length` probes at each length, needles at evenly spread depths, each starting with `prefix`."""
    return [make_probe(encode, length, i, per_length, seed, prefix) for length in lengths for i in range(per_length)]
