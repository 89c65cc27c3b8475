"""Token ids as the evaluated model sees them, one convention for every pipeline (lm-eval's prompts, the task
generators' lengths, head-selection probes, gamma calibration): the tokenizer's own special tokens, as
`tokenizer(text)` adds them (BOS for Llama's tokenizers, none for GPT-2-style ones), except where the text already
starts with the BOS token's text (a chat template that writes it), which is what lm-eval's HFLM does when it
encodes a prompt (`tok_encode`, `tok_batch_encode`, with `add_bos_token` unset as `hhbench eval` leaves it)."""


def writes_bos(tokenizer, text: str) -> bool:
    """Whether `text` already starts with the BOS token's text (a chat template that writes it), so that
    `encode` adds no special tokens to it."""
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def encode(tokenizer, text: str) -> list[int]:
    """The ids of a whole prompt, special tokens as the tokenizer adds them (see the module's doc)."""
    return list(tokenizer(text, add_special_tokens=not writes_bos(tokenizer, text))["input_ids"])


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a prompt's own ([BOS] for Llama's, [] for most others): what a prompt
    built from separately encoded pieces starts with, to match `encode` of the whole text."""
    text = "a"
    whole, plain = encode(tokenizer, text), tokenizer(text, add_special_tokens=False)["input_ids"]
    start = next((i for i in range(len(whole) - len(plain) + 1) if whole[i : i + len(plain)] == plain), 0)
    return list(whole[:start])
