"""Deterministic offline generators of the long-context tasks, sized in the model's own tokens.

Every sample is a prompt (instruction, a haystack of filler sentences with what is to be found inside, a
question) ending in an answer prefix, and the answer strings it must produce. Sample i of (task, length, seed)
is the same whatever the sample count. The haystack is fitted with the tokenizer: the largest number of filler
sentences whose whole prompt, as the model sees it (chat template included where used), stays within the
target; the sentences are short, so the prompt lands within a few tokens under the target.

Tasks:
- passkey: the classic pass-key retrieval (Mohtashami & Jaggi 2023): a 5-digit key in repeated noise.
- niah_single: RULER's needle in a haystack, "The special magic number for KEY is: N." in generated
  essay-like filler; one needle.
- niah_multikey: the same with 4 needles of different keys; the question names one.
- vt: RULER's variable tracking: one chain of 5 variables (VAR A = N, VAR B = VAR A, ...) in noise; all 5
  names are the answer (each found one earns 1/5).
- copy: token-level fidelity: a 32-character random string in noise, to be repeated verbatim.
"""

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from hhbench.models.tokens import encode

NOISE = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]

# Word lists for keys and for the essay-like filler (generated, so nothing needs to be downloaded).
ADJECTIVES = ("ancient bitter brave calm clever crimson curious distant eager fragile gentle golden hidden humble "
              "icy jolly kind lively lonely loud mellow misty noble odd pale proud quiet rapid rusty silent silver "
              "smooth sour steady sturdy swift tender tidy vivid wild wise young zesty").split()  # fmt: skip
NOUNS = ("anchor badger basket beacon canyon castle cedar comet compass crystal desert dragon falcon feather "
         "forest garden glacier harbor island jungle kettle lantern meadow mirror mountain needle orchard otter "
         "palace pepper pirate planet quarry river saddle shadow spider summit temple thunder tiger tower valley "
         "violin walnut willow wizard").split()  # fmt: skip
SUBJECTS = ("the farmer", "a traveller", "the old teacher", "my neighbour", "the committee", "a young engineer",
            "the baker", "our guide", "the river pilot", "a quiet student", "the town council", "the gardener")  # fmt: skip
VERBS = ("planted", "described", "repaired", "painted", "measured", "carried", "studied", "visited", "sold",
         "counted", "cleaned", "remembered")  # fmt: skip
OBJECTS = ("a row of apple trees", "the northern bridge", "an old wooden boat", "the market square",
           "a basket of letters", "the narrow road to the coast", "three clay pots", "the library roof",
           "a map of the valley", "the evening train", "a field of barley", "the stone wall by the church")  # fmt: skip
TAILS = ("before the rain came", "during the long winter", "with great care", "for the summer fair",
         "without saying a word", "as the sun went down", "on a Tuesday morning", "in the usual way",
         "after a short rest", "because nobody else would")  # fmt: skip
REFLECTIONS = ("Small habits shape a town more than grand plans do.", "Most work is done slowly and then all at once.",
               "People remember stories better than numbers.", "A good tool is one you stop noticing.",
               "Every season brings its own kind of patience.", "Careful records save a great deal of argument.")  # fmt: skip


@dataclass(frozen=True)
class TaskDef:
    """One generated long-context task (module docstring): its name, sample maker, generation budget (tokens),
    description, and scoring (a generation, or the answer's log-likelihood against a control prompt)."""

    name: str
    make: Callable[[random.Random], "Parts"]
    max_gen_toks: int
    description: str
    # "loglikelihood" tasks score the answer's log-likelihood after the prompt instead of a generation, and after
    # a control prompt whose needle holds another value: the difference is a continuous measure of retrieval that
    # still moves when greedy answers are all wrong, and that a model damaged everywhere does not fake. Their docs
    # are those of the `base` task, prompt for prompt.
    scoring: str = "generate"
    base: str = ""

    @property
    def primary_metric(self) -> str:
        """The metric eval tables lead with: retrieval_gain for log-likelihood tasks, else acc."""
        return "retrieval_gain" if self.scoring == "loglikelihood" else PRIMARY_METRIC


@dataclass(frozen=True)
class Parts:
    """What a task contributes: the instruction, the needles (placed at random depths in order), the filler
    maker, the question, the answer prefix and the answers."""

    instruction: str
    needles: list[str]
    filler: Callable[[random.Random, int], list[str]]  # (rng, count) -> sentences
    question: str
    answer_prefix: str
    outputs: list[str]


def noise_filler(rng: random.Random, count: int) -> list[str]:
    """`count` sentences of the pass-key noise (Mohtashami & Jaggi 2023), in order; `rng` unused."""
    return [NOISE[i % len(NOISE)] for i in range(count)]


def essay_filler(rng: random.Random, count: int) -> list[str]:
    """`count` essay-like sentences generated from the word lists (RULER's haystack is essays; nothing downloads)."""
    sentences = []
    for _ in range(count):
        if rng.random() < 0.15:
            sentences.append(rng.choice(REFLECTIONS))
        else:
            subject = rng.choice(SUBJECTS)
            sentence = f"{subject} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}."
            sentences.append(sentence[0].upper() + sentence[1:])
    return sentences


def random_key(rng: random.Random) -> str:
    """A random 'adjective-noun' key for a needle (KEY in the module docstring)."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def number(rng: random.Random, digits: int) -> str:
    """A random decimal number of exactly `digits` digits, as text."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _in_noise(instruction: str, needle: str, question: str, answer_prefix: str, answer: str) -> Parts:
    """One needle in the repeated noise."""
    return Parts(instruction, [needle], noise_filler, question, answer_prefix, [answer])


def _passkey(rng: random.Random) -> Parts:
    key = number(rng, 5)
    return _in_noise(
        "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize "
        "it. I will quiz you about the important information there.",
        f"The pass key is {key}. Remember it. {key} is the pass key.",
        "What is the pass key? Answer with the number only.",
        "The pass key is",
        key,
    )


NIAH_INSTRUCTION = (
    "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you about "
    "the magic number afterwards."
)


def _niah(rng: random.Random, keys: int) -> Parts:
    names = []
    while len(names) < keys:
        name = random_key(rng)
        if name not in names:
            names.append(name)
    values = [number(rng, 7) for _ in names]
    needles = [f"The special magic number for {n} is: {v}." for n, v in zip(names, values, strict=True)]
    rng.shuffle(needles)
    asked = rng.randrange(keys)
    instruction = NIAH_INSTRUCTION
    if keys > 1:
        instruction = instruction.replace("A special magic number is", "Some special magic numbers are")
        instruction = instruction.replace("the magic number", "one of the magic numbers")
    return Parts(
        instruction=instruction,
        needles=needles,
        filler=essay_filler,
        question=f"What is the special magic number for {names[asked]} mentioned in the provided text?",
        answer_prefix=f"The special magic number for {names[asked]} mentioned in the provided text is",
        outputs=[values[asked]],
    )


def _vt(rng: random.Random, hops: int = 4) -> Parts:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = number(rng, 5)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    return Parts(
        instruction="Memorize and track the chain of variable assignments hidden in the following text.",
        needles=needles,
        filler=noise_filler,
        question=f"Question: Find all variables that are assigned the value {value} in the text above.",
        answer_prefix=f"Answer: According to the chain of variable assignments in the text above, {hops + 1} "
        f"variables are assigned the value {value}, they are:",
        outputs=names,
    )


COPY_ALPHABET = string.ascii_lowercase + string.digits


def _copy(rng: random.Random, length: int = 32) -> Parts:
    code = "".join(rng.choice(COPY_ALPHABET) for _ in range(length))
    return _in_noise(
        "A secret code is hidden inside the following text. Memorize it exactly, character by character; I will "
        "ask you to repeat it.",
        f"The secret code is {code} and nothing else.",
        "Repeat the secret code exactly, character by character.",
        "The secret code is",
        code,
    )


TASKS: dict[str, TaskDef] = {
    task.name: task
    for task in (
        TaskDef("passkey", _passkey, 12, "5-digit pass key in repeated noise"),
        TaskDef("niah_single", lambda rng: _niah(rng, 1), 16, "one 7-digit magic number in essay-like filler"),
        TaskDef("niah_multikey", lambda rng: _niah(rng, 4), 16, "one of 4 keyed magic numbers in essay-like filler"),
        TaskDef("vt", _vt, 40, "variable tracking: a chain of 5 variables in noise, name them all"),
        TaskDef("copy", _copy, 40, "repeat a 32-character random string verbatim"),
        TaskDef(
            "passkey_ll",
            _passkey,
            0,
            "passkey's prompts, scored by the answer's log-likelihood",
            "loglikelihood",
            "passkey",
        ),
        TaskDef(
            "niah_single_ll",
            lambda rng: _niah(rng, 1),
            0,
            "niah_single's prompts, scored by the answer's log-likelihood",
            "loglikelihood",
            "niah_single",
        ),
    )
}


def render(instruction: str, context: str, question: str, answer_prefix: str, tokenizer, chat: bool) -> str:
    """The prompt as the model sees it: the chat template's user turn (when `chat`) or plain text, and the answer
    prefix the model continues."""
    body = f"{instruction}\n\n{context}\n\n{question}"
    if chat:
        messages = [{"role": "user", "content": body}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + answer_prefix
    return f"{body}\n{answer_prefix}"


def count_tokens(tokenizer, text: str) -> int:
    """A prompt's length as the model sees it: special tokens as the tokenizer adds them (hhbench.models.tokens)."""
    return len(encode(tokenizer, text))


def continuation_tokens(tokenizer, text: str) -> int:
    """A continuation's length: lm-eval encodes it after its context, with no special tokens of its own."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fill(parts: Parts, rng: random.Random, n: int, depths: list[float], words: int = 0) -> str:
    """n filler sentences with the needles at their depths, then the first `words` words of sentence n + 1 (the
    last top-up that brings the prompt to the target within a few tokens, whatever the tokenizer)."""
    filler = parts.filler(rng, n + 1)
    placed = filler[:n]
    for depth, needle in sorted(zip(depths, parts.needles, strict=True), key=lambda p: p[0], reverse=True):
        placed.insert(round(depth * n), needle)
    if words:
        placed.append(" ".join(filler[n].split()[:words]))
    return " ".join(placed)


def generate(
    task: str, tokenizer, length: int, samples: int, seed: int = 0, chat: bool = False, start: int = 0
) -> list[dict]:
    """`samples` docs of `task` with prompts of at most `length` tokens (and within 2% under it). ValueError where
    a sample's fixed text alone (see fixed_tokens) exceeds `length`."""
    spec = TASKS[task]
    docs = []
    for index in range(start, start + samples):
        parts, fill_seed, prompt = _sample(task, tokenizer, length, seed, chat, index)
        fixed = count_tokens(tokenizer, prompt(0))
        if fixed > length:
            raise ValueError(
                f"{task} sample {index}: its fixed text takes {fixed} tokens, more than the length {length}"
            )
        n = _largest_fitting(lambda n, prompt=prompt: count_tokens(tokenizer, prompt(n)), length)
        next_words = len(parts.filler(random.Random(fill_seed), n + 1)[n].split())
        words = _largest_fitting(
            lambda k, prompt=prompt, n=n, top=next_words: (
                count_tokens(tokenizer, prompt(n, k)) if k < top else length + 1
            ),
            length,
        )
        text = prompt(n, words)
        extra = {}
        if spec.scoring == "loglikelihood":
            answer = parts.outputs[0]
            other = random.Random(f"{task}:{length}:{seed}:{index}:control")
            counter = answer
            while counter == answer:
                counter = number(other, len(answer))
            extra = {"control": text.replace(answer, counter), "continuation": " " + answer,
                     "answer_tokens": continuation_tokens(tokenizer, " " + answer)}  # fmt: skip
        docs.append(
            {
                "index": index,
                "input": text,
                "outputs": parts.outputs,
                "length": count_tokens(tokenizer, text),
                "max_length": length,
                "task": task,
                "seed": seed,
                **extra,
            }
        )
    return docs


def _sample(task: str, tokenizer, length: int, seed: int, chat: bool, index: int):
    """Sample `index` of (task, length, seed): its parts, the seed of its filler, and prompt(n, words), its prompt
    with n filler sentences and `words` words of one more."""
    spec = TASKS[task]
    rng = random.Random(f"{spec.base or task}:{length}:{seed}:{index}")
    parts = spec.make(rng)
    depths = sorted(rng.random() for _ in parts.needles)
    fill_seed = rng.random()

    def prompt(n: int, words: int = 0) -> str:
        context = _fill(parts, random.Random(fill_seed), n, depths, words)
        return render(parts.instruction, context, parts.question, parts.answer_prefix, tokenizer, chat)

    return parts, fill_seed, prompt


def fixed_tokens(task: str, tokenizer, length: int, samples: int, seed: int = 0, chat: bool = False) -> int:
    """The most tokens the fixed text of one of the `samples` samples at `length` takes (instruction, needles,
    question, answer prefix, chat template; no filler): below it, a prompt cannot be made to fit."""
    return max(count_tokens(tokenizer, _sample(task, tokenizer, length, seed, chat, i)[2](0)) for i in range(samples))


def _largest_fitting(size: Callable[[int], int], target: int) -> int:
    """The largest n with size(n) <= target (size grows with n); 0 when even no filler fits."""
    low, high = 0, 1
    while size(high) <= target:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if size(mid) <= target:
            low = mid
        else:
            high = mid
    return low


def normalize(text: str) -> str:
    """`text` with whitespace runs collapsed to single spaces and the ends stripped."""
    return " ".join(text.strip().split())


def score(task: str, prediction: str, outputs: list[str]) -> dict[str, float]:
    """Metrics of one generation. acc: the fraction of answer strings found in the generated text (RULER's
    string_match_all; case-insensitive), for copy the verbatim (case-sensitive) presence of the string;
    copy also gets prefix_frac, the longest correct prefix of the copy as a fraction of the string's length."""
    prediction = normalize(prediction)
    if task == "copy":
        code = outputs[0]
        candidate = prediction.split()[0] if prediction.split() else ""
        prefix = 0
        while prefix < min(len(candidate), len(code)) and candidate[prefix] == code[prefix]:
            prefix += 1
        return {"acc": float(code in prediction), "prefix_frac": prefix / len(code)}
    lowered = prediction.lower()
    return {"acc": sum(answer.lower() in lowered for answer in outputs) / len(outputs)}


def score_loglikelihood(doc: dict, real: tuple[float, bool], control: tuple[float, bool]) -> dict[str, float]:
    """Per answer token, in nats: answer_nll after the real prompt (lower is better; a 5-digit key guessed digit
    by digit costs ln 10 = 2.30), control_nll after the control prompt (the needle holds another value), and
    retrieval_gain = control_nll - answer_nll (what reading the needle is worth; 0 for a model that ignores it);
    acc: the answer is the greedy continuation of the real prompt."""
    answer_nll, control_nll = -real[0] / doc["answer_tokens"], -control[0] / doc["answer_tokens"]
    return {"answer_nll": answer_nll, "control_nll": control_nll, "retrieval_gain": control_nll - answer_nll,
            "acc": float(real[1])}  # fmt: skip


def primary_metric(task: str) -> str:
    """The metric a comparison reads for a task: retrieval_gain for log-likelihood tasks, acc otherwise."""
    return TASKS[task].primary_metric if task in TASKS else PRIMARY_METRIC


LOGLIKELIHOOD_METRICS = ("retrieval_gain", "answer_nll", "control_nll", "acc")
METRICS = {"copy": ("acc", "prefix_frac"), "passkey_ll": LOGLIKELIHOOD_METRICS, "niah_single_ll": LOGLIKELIHOOD_METRICS}
PRIMARY_METRIC = "acc"
