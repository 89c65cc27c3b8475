"""Model shapes: the handful of numbers the cost model and the kernels need from a transformer."""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from hhbench.errors import UserError


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a transformer the cost model and the kernels need: widths, layer and head counts (GQA: n_heads
    a multiple of n_kv_heads), MLP width and vocabulary (0 for an attention-only shape), biases, q/k norms and
    sliding windows, as Hugging Face configs give them. Raises UserError for a non-positive size."""

    name: str
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int  # gated (SwiGLU) MLP width; 0 for an attention-only shape
    vocab: int  # 0 for an attention-only shape (no embedding, no LM head)
    tie_embeddings: bool = False
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2; Llama's and Qwen3's attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama's and Qwen3's attention_bias)
    qk_norm: bool = False  # RMSNorm weights of head_dim on queries and keys, shared by the heads (Qwen3)
    mlp_bias: bool = False  # biases on the MLP's gate, up and down projections (Llama's mlp_bias)
    # Per layer, the sliding window in keys a query attends to (itself included; 0: full causal attention),
    # as transformers masks it: () where no layer has a window (Mistral's sliding_window, Qwen2/3's layer_types).
    layer_windows: tuple[int, ...] = ()

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
        if self.layer_windows and (len(self.layer_windows) != self.n_layers or min(self.layer_windows) < 0):
            raise UserError(f"model {self.name}: layer_windows needs {self.n_layers} windows >= 0")
        if not any(self.layer_windows):  # one spelling of "no window", so that equal shapes compare equal
            object.__setattr__(self, "layer_windows", ())

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads

    def kv_group(self, head: int) -> int:
        """The KV head (group) query head `head` reads under GQA."""
        return head // self.group_size

    def window(self, layer: int) -> int:
        """The sliding window of layer `layer` in keys, 0 for full attention."""
        return self.layer_windows[layer] if self.layer_windows else 0

    @property
    def windowed(self) -> str:
        """'' without sliding windows, else what they are, for messages: 'window 4096 in 32 of 32 layers'."""
        windows = sorted({w for w in self.layer_windows if w})
        count = sum(1 for w in self.layer_windows if w)
        return f"window {'/'.join(map(str, windows))} in {count} of {self.n_layers} layers" if windows else ""


PRESETS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        # The HydraHead paper's base model.
        ModelShape("qwen3-1.7b", 2048, 28, 16, 8, 128, 6144, 151936, tie_embeddings=True, qk_norm=True),
        ModelShape("llama3-8b", 4096, 32, 32, 8, 128, 14336, 128256),
        ModelShape("smollm2-135m", 576, 30, 9, 3, 64, 1536, 49152, tie_embeddings=True),
        # One attention layer: the kernel-level default.
        ModelShape("h32d128", 4096, 1, 32, 32, 128, 0, 0),
        # Small enough for CPU tests of every code path (GQA included).
        ModelShape("tiny", 64, 4, 8, 4, 8, 128, 256, tie_embeddings=True),
    )
}

_INT_FIELDS = ("hidden", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_hidden", "vocab")
_BOOL_FIELDS = ("tie_embeddings", "qkv_bias", "o_bias", "qk_norm", "mlp_bias")
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def shape_from_hf_config(path: Path) -> ModelShape:
    """Read a Hugging Face config.json (Llama, Qwen2/3, Mistral and alike)."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read model config {path}: {exc}") from None
    return shape_from_config_dict(config, Path(path).parent.name or Path(path).stem, f"model config {path}")


_REQUIRED = object()
_KINDS = {int: "an integer", bool: "true or false", str: "a string", float: "a number"}


def config_field(config: dict, key: str, kind: type, source: str, default=_REQUIRED, minimum: float | None = None):
    """config[key] checked for type (int, bool, str or float) and lower bound; a missing or null key takes
    `default`, or is an error where the field is required. Errors name the field: one line, exit 2."""
    value = config.get(key)
    if value is None:
        if default is _REQUIRED:
            raise UserError(f"{source} lacks {key!r}")
        return default
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise UserError(f"{source}: {key} must be {_KINDS[kind]}, got {json.dumps(value)[:60]}")
    if minimum is not None and value < minimum:
        raise UserError(f"{source}: {key} must be >= {minimum}, got {value}")
    return value


# What an architecture implies beyond the sizes in its config (transformers' modeling code): q/k/v bias, o bias
# (True/False, or the config's attention_bias), q/k norm, and whether mlp_bias is read. A config without
# model_type is read as Llama's.
_ARCHITECTURES = {
    "llama": ("attention_bias", "attention_bias", False, True),
    "mistral": (False, False, False, False),
    "qwen2": (True, False, False, False),
    "qwen3": ("attention_bias", "attention_bias", True, False),
}


_LAYER_TYPES = {"full_attention": False, "sliding_attention": True}
_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")


def _layer_windows(config: dict, model_type: str, n_layers: int, source: str) -> tuple[int, ...]:
    """Per layer, the sliding window transformers' modeling code applies (0: none). Llama has none; Mistral
    windows every layer by sliding_window; Qwen2/3 only with use_sliding_window, in the layers layer_types marks
    sliding_attention or, without layer_types, from layer max_window_layers on."""
    if model_type == "llama":
        return ()
    window = config_field(config, "sliding_window", int, source, 0, minimum=1)
    if model_type == "mistral":
        return (window,) * n_layers
    if not config_field(config, "use_sliding_window", bool, source, False):
        window = 0
    layer_types = config.get("layer_types")
    if layer_types is None:
        first = config_field(config, "max_window_layers", int, source, 28, minimum=0)
        return tuple(window if i >= first else 0 for i in range(n_layers))
    if not isinstance(layer_types, list) or len(layer_types) != n_layers or not set(layer_types) <= set(_LAYER_TYPES):
        raise UserError(
            f"{source}: layer_types must list one of {', '.join(_LAYER_TYPES)} for each of the {n_layers} layers"
        )
    return tuple(window if _LAYER_TYPES[kind] else 0 for kind in layer_types)


_ROPE_NUMBERS = {"factor": float, "original_max_position_embeddings": int, "low_freq_factor": float,
                 "high_freq_factor": float, "beta_fast": float, "beta_slow": float, "attention_factor": float,
                 "mscale": float, "mscale_all_dim": float}  # fmt: skip


def _check_rope(config: dict, source: str) -> None:
    """RoPE variants change only the rotary embedding that conversion and tracing take from the teacher, and no
    matmul of the cost model; partial RoPE changes what the attention layers compute and is not modelled."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise UserError(f"{source}: {key} must be an object, got {json.dumps(rope)[:60]}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in _ROPE_TYPES:
            raise UserError(f"{source}: {key} rope_type {kind!r} is not one of {', '.join(_ROPE_TYPES)}")
        config_field(rope, "rope_theta", float, f"{source}: {key}", 1.0, minimum=0)
        for name, kind in _ROPE_NUMBERS.items():  # the scaling types' parameters (transformers' rope_utils)
            config_field(rope, name, kind, f"{source}: {key}", None, minimum=0)
        for name in ("long_factor", "short_factor"):  # longrope: one factor per rotary frequency
            factors = rope.get(name)
            if factors is not None and not (
                isinstance(factors, list)
                and all(isinstance(f, int | float) and not isinstance(f, bool) for f in factors)
            ):
                raise UserError(f"{source}: {key} {name} must be a list of numbers, got {json.dumps(factors)[:60]}")
        _check_partial_rotary(rope, f"{source}: {key}")
    config_field(config, "rope_theta", float, source, 1.0, minimum=0)
    _check_partial_rotary(config, source)


def _check_partial_rotary(config: dict, source: str) -> None:
    factor = config_field(config, "partial_rotary_factor", float, source, 1.0, minimum=0)
    if factor != 1:
        raise UserError(
            f"{source}: partial_rotary_factor={factor} (partial RoPE) is not supported: hhbench rotates whole heads"
        )


def shape_from_config_dict(config: dict, default_name: str = "model", source: str = "model config") -> ModelShape:
    """The shape of a Hugging Face config as a dict (config.json, or a loaded model's `config.to_dict()`).

    Every field read is checked for presence, type and range; a bad one is a UserError naming it."""
    if not isinstance(config, dict):
        raise UserError(f"{source}: expected a JSON object of config fields, got {type(config).__name__}")
    model_type = config_field(config, "model_type", str, source, "llama")
    if model_type not in _ARCHITECTURES:
        raise UserError(
            f"{source}: model_type {model_type!r} is not supported: hhbench reads {', '.join(_ARCHITECTURES)} configs"
        )
    qkv_bias, o_bias, qk_norm, reads_mlp_bias = _ARCHITECTURES[model_type]
    _check_rope(config, source)
    config_field(config, "rms_norm_eps", float, source, 1e-6, minimum=0)  # conversion's q/k and head norms read it
    if config_field(config, "attention_dropout", float, source, 0.0, minimum=0) >= 1:
        raise UserError(f"{source}: attention_dropout must be below 1, got {config['attention_dropout']}")
    attention_bias = config_field(config, "attention_bias", bool, source, False)
    qkv_bias = attention_bias if qkv_bias == "attention_bias" else qkv_bias
    o_bias = attention_bias if o_bias == "attention_bias" else o_bias
    hidden = config_field(config, "hidden_size", int, source, minimum=1)
    n_heads = config_field(config, "num_attention_heads", int, source, minimum=1)
    n_kv_heads = config_field(config, "num_key_value_heads", int, source, n_heads, minimum=1)
    head_dim = config_field(config, "head_dim", int, source, 0, minimum=1)
    if not head_dim:
        if hidden % n_heads:
            raise UserError(
                f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={n_heads}; give head_dim"
            )
        head_dim = hidden // n_heads
    if n_heads % n_kv_heads:
        raise UserError(
            f"{source}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv_heads}"
        )
    n_layers = config_field(config, "num_hidden_layers", int, source, minimum=1)
    return ModelShape(
        name=config_field(config, "_name_or_path", str, source, "") or default_name,
        hidden=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        mlp_hidden=config_field(config, "intermediate_size", int, source, minimum=1),
        vocab=config_field(config, "vocab_size", int, source, minimum=1),
        tie_embeddings=config_field(config, "tie_word_embeddings", bool, source, False),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=qk_norm,
        mlp_bias=reads_mlp_bias and config_field(config, "mlp_bias", bool, source, False),
        layer_windows=_layer_windows(config, model_type, n_layers, source),
    )


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
    """`shape` with `field=value` overrides (integer and boolean fields, name, sliding_window for every layer); a
    changed shape is renamed '<name>+field=value' unless name is given. Raises UserError for a bad item."""
    changes: dict[str, object] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"bad shape override {item!r}: expected field=value")
        if key in _BOOL_FIELDS:
            flag = value.strip().lower()
            if flag not in _TRUE + _FALSE:
                raise UserError(f"bad shape override {item!r}: {key} takes true or false")
            changes[key] = flag in _TRUE
        elif key == "name":
            changes[key] = value.strip()
        elif key in _INT_FIELDS or key == "sliding_window":
            try:
                number = int(value)
            except ValueError:
                raise UserError(f"bad shape override {item!r}: {key} takes an integer") from None
            # the range config.json's fields get: an attention-only shape (mlp_hidden, vocab 0) is a preset
            if key in _INT_FIELDS:
                config_field({key: number}, key, int, f"bad shape override {item!r}", minimum=1)
            changes[key] = number
        else:
            fields = ", ".join(("name", *_INT_FIELDS, *_BOOL_FIELDS, "sliding_window"))
            raise UserError(f"unknown model field {key!r} in {item!r}: fields are {fields}")
    if changes and "name" not in changes:
        changes["name"] = shape.name + "".join(f"+{k}={v}" for k, v in changes.items())
    n_layers = changes.get("n_layers", shape.n_layers)
    if "sliding_window" in changes:  # one window for every layer; 0 removes them
        window = changes.pop("sliding_window")
        if window < 0:
            raise UserError(f"bad shape override sliding_window={window}: a window is >= 0 tokens (0: none)")
        changes["layer_windows"] = (window,) * n_layers
    elif shape.layer_windows and n_layers != shape.n_layers:
        if len(set(shape.layer_windows)) > 1:
            raise UserError(f"model {shape.name} has different windows by layer: give sliding_window with n_layers")
        changes["layer_windows"] = (shape.layer_windows[0],) * n_layers
    return dataclasses.replace(shape, **changes)
