"""Model shapes: the handful of numbers the cost model and the kernels need from a transformer."""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from hhbench.errors import UserError


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int  # gated (SwiGLU) MLP width; 0 for an attention-only shape
    vocab: int  # 0 for an attention-only shape (no embedding, no LM head)
    tie_embeddings: bool = False

    def __post_init__(self):
        for field in ("hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise UserError(f"model {self.name}: {field} must be positive, got {getattr(self, field)}")
        for field in ("mlp_hidden", "vocab"):
            if getattr(self, field) < 0:
                raise UserError(f"model {self.name}: {field} must be >= 0, got {getattr(self, field)}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"model {self.name}: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads

    def kv_group(self, head: int) -> int:
        return head // self.group_size


PRESETS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        # The HydraHead paper's base model.
        ModelShape("qwen3-1.7b", 2048, 28, 16, 8, 128, 6144, 151936, tie_embeddings=True),
        ModelShape("llama3-8b", 4096, 32, 32, 8, 128, 14336, 128256),
        ModelShape("smollm2-135m", 576, 30, 9, 3, 64, 1536, 49152, tie_embeddings=True),
        # One attention layer: the kernel-level default.
        ModelShape("h32d128", 4096, 1, 32, 32, 128, 0, 0),
        # Small enough for CPU tests of every code path (GQA included).
        ModelShape("tiny", 64, 4, 8, 4, 8, 128, 256, tie_embeddings=True),
    )
}

_INT_FIELDS = ("hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_hidden", "vocab")


def shape_from_hf_config(path: Path) -> ModelShape:
    """Read a Hugging Face config.json (Llama, Qwen2/3, Mistral and alike)."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read model config {path}: {exc}") from None
    return shape_from_config_dict(config, Path(path).parent.name or Path(path).stem, f"model config {path}")


def shape_from_config_dict(config: dict, default_name: str = "model", source: str = "model config") -> ModelShape:
    """The shape of a Hugging Face config as a dict (config.json, or a loaded model's `config.to_dict()`)."""
    try:
        hidden = int(config["hidden_size"])
        n_heads = int(config["num_attention_heads"])
        return ModelShape(
            name=config.get("_name_or_path") or default_name,
            hidden=hidden,
            n_layers=int(config["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            head_dim=int(config.get("head_dim") or hidden // n_heads),
            mlp_hidden=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except KeyError as exc:
        raise UserError(f"{source} lacks {exc.args[0]!r}") from None


def resolve_shape(model: str, overrides: list[str] | tuple[str, ...] = ()) -> ModelShape:
    """A preset name or a config.json path, then `field=value` overrides."""
    if model in PRESETS:
        shape = PRESETS[model]
    elif model.endswith(".json") or Path(model).is_dir():
        path = Path(model) / "config.json" if Path(model).is_dir() else Path(model)
        shape = shape_from_hf_config(path)
    else:
        raise UserError(f"unknown model {model!r}: presets are {', '.join(PRESETS)}, or give a config.json path")
    return apply_overrides(shape, overrides)


def apply_overrides(shape: ModelShape, overrides: list[str] | tuple[str, ...]) -> ModelShape:
    changes: dict[str, object] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"bad shape override {item!r}: expected field=value")
        if key == "tie_embeddings":
            changes[key] = value.strip().lower() in ("1", "true", "yes")
        elif key == "name":
            changes[key] = value.strip()
        elif key in _INT_FIELDS:
            try:
                changes[key] = int(value)
            except ValueError:
                raise UserError(f"bad shape override {item!r}: {key} takes an integer") from None
        else:
            fields = ", ".join(f.name for f in dataclasses.fields(ModelShape))
            raise UserError(f"unknown model field {key!r} in {item!r}: fields are {fields}")
    if changes and "name" not in changes:
        changes["name"] = shape.name + "".join(f"+{k}={v}" for k, v in changes.items())
    return dataclasses.replace(shape, **changes)
