"""Model shapes read from Hugging Face configs: every field checked, published parameter counts."""

import pytest

from hhbench.analytic.costs import analytic_costs
from hhbench.errors import UserError
from hhbench.spec.axes import Pass
from hhbench.spec.hybrid import HybridSpec, Layout, Ratio
from hhbench.spec.layout import build_plan
from hhbench.spec.shapes import apply_overrides, shape_from_config_dict

LLAMA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 96, "vocab_size": 100}  # fmt: skip


def test_a_minimal_config_and_its_defaults():
    shape = shape_from_config_dict(dict(LLAMA), "m")
    assert (shape.name, shape.head_dim, shape.n_kv_heads, shape.tie_embeddings) == ("m", 16, 2, False)
    nulls = shape_from_config_dict({**LLAMA, "num_key_value_heads": None, "head_dim": None, "_name_or_path": ""})
    assert (nulls.n_kv_heads, nulls.head_dim, nulls.name) == (4, 16, "model")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"hidden_size": "64"}, 'hidden_size must be an integer, got "64"'),
        ({"hidden_size": 64.0}, "hidden_size must be an integer, got 64.0"),
        ({"hidden_size": True}, "hidden_size must be an integer, got true"),
        ({"hidden_size": 0}, "hidden_size must be >= 1, got 0"),
        ({"num_hidden_layers": -2}, "num_hidden_layers must be >= 1, got -2"),
        ({"num_attention_heads": [4]}, "num_attention_heads must be an integer, got [4]"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be >= 1, got 0"),
        ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        ({"head_dim": -8}, "head_dim must be >= 1, got -8"),
        ({"num_attention_heads": 6, "num_key_value_heads": 6}, "hidden_size=64 is not a multiple of"),
        ({"intermediate_size": None}, "lacks 'intermediate_size'"),
        ({"vocab_size": 1.5}, "vocab_size must be an integer"),
        ({"tie_word_embeddings": "yes"}, 'tie_word_embeddings must be true or false, got "yes"'),
        ({"_name_or_path": 7}, "_name_or_path must be a string, got 7"),
    ],
)
def test_a_bad_field_is_named(change, message):
    config = {**LLAMA, **change}
    with pytest.raises(UserError) as error:
        shape_from_config_dict(config, source="model config c.json")
    assert str(error.value).startswith("model config c.json") and message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("key", sorted(set(LLAMA) - {"num_key_value_heads"}))
def test_every_required_field_is_required(key):
    config = {k: v for k, v in LLAMA.items() if k != key}
    with pytest.raises(UserError, match=f"lacks '{key}'"):
        shape_from_config_dict(config)


@pytest.mark.parametrize("config", [[1, 2, 3], "text", 3, None])
def test_not_an_object(config):
    with pytest.raises(UserError, match="expected a JSON object"):
        shape_from_config_dict(config)


@pytest.mark.parametrize("value,expected", [("true", True), ("0", False), ("No", False), ("YES", True)])
def test_boolean_override(value, expected):
    shape = shape_from_config_dict(dict(LLAMA))
    assert apply_overrides(shape, [f"tie_embeddings={value}"]).tie_embeddings is expected


def test_a_boolean_override_that_is_no_boolean():
    with pytest.raises(UserError, match="tie_embeddings takes true or false"):
        apply_overrides(shape_from_config_dict(dict(LLAMA)), ["tie_embeddings=maybe"])


# The published config.json values (only what a shape reads) and the published parameter totals.
PUBLISHED = {
    "Qwen3-4B": ({"model_type": "qwen3", "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 9728, "vocab_size": 151936,
                  "attention_bias": False, "tie_word_embeddings": True}, 4_022_468_096),
    "Qwen2.5-72B": ({"model_type": "qwen2", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                     "num_key_value_heads": 8, "intermediate_size": 29568, "vocab_size": 152064,
                     "tie_word_embeddings": False}, 72_706_203_648),
    "Qwen2.5-0.5B": ({"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                      "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
                      "tie_word_embeddings": True}, 494_032_768),
    "Llama-3.1-8B": ({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                      "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                      "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}, 8_030_261_248),
    "Mistral-7B-v0.1": ({"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                         "vocab_size": 32000, "tie_word_embeddings": False}, 7_241_732_096),
}  # fmt: skip


def parameters(shape) -> float:
    plan = build_plan(shape, HybridSpec(Layout.FA, Ratio(0, 1)))
    return analytic_costs(plan, Pass.PREFILL, 1, dtype="fp32").weight_bytes / 4


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_totals(name):
    config, total = PUBLISHED[name]
    assert parameters(shape_from_config_dict(config, name)) == total


def test_every_bias_and_norm_a_config_implies_is_counted():
    base = shape_from_config_dict(dict(LLAMA))  # hidden 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 96
    q, kv = 4 * 16, 2 * 16
    biased = shape_from_config_dict({**LLAMA, "attention_bias": True, "mlp_bias": True})
    assert parameters(biased) - parameters(base) == 2 * ((q + 2 * kv + 64) + (2 * 96 + 64))
    qwen2 = shape_from_config_dict({**LLAMA, "model_type": "qwen2", "attention_bias": True, "mlp_bias": True})
    assert parameters(qwen2) - parameters(base) == 2 * (q + 2 * kv)  # Qwen2: q/k/v biases whatever the config says
    qwen3 = shape_from_config_dict({**LLAMA, "model_type": "qwen3", "attention_bias": True})
    assert parameters(qwen3) - parameters(base) == 2 * ((q + 2 * kv + 64) + 2 * 16)
    mistral = shape_from_config_dict({**LLAMA, "model_type": "mistral", "attention_bias": True, "mlp_bias": True})
    assert parameters(mistral) == parameters(base)  # Mistral's projections have no biases


def test_an_architecture_hhbench_does_not_know_is_refused():
    with pytest.raises(UserError, match="model_type 'gemma2' is not supported: hhbench reads llama, mistral"):
        shape_from_config_dict({**LLAMA, "model_type": "gemma2"})
    with pytest.raises(UserError, match="attention_bias must be true or false"):
        shape_from_config_dict({**LLAMA, "attention_bias": 1})


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "mistral", "sliding_window": "4096"}, 'sliding_window must be an integer, got "4096"'),
        ({"model_type": "mistral", "sliding_window": 0}, "sliding_window must be >= 1, got 0"),
        ({"model_type": "qwen2", "use_sliding_window": "no"}, 'use_sliding_window must be true or false, got "no"'),
        ({"model_type": "qwen3", "max_window_layers": -1}, "max_window_layers must be >= 0, got -1"),
        ({"model_type": "qwen3", "layer_types": ["full_attention"]}, "layer_types must list one of full_attention"),
        ({"model_type": "qwen2", "layer_types": ["full_attention", "chunked_attention"]}, "for each of the 2 layers"),
        ({"rope_scaling": "linear"}, 'rope_scaling must be an object, got "linear"'),
        ({"rope_scaling": {"type": "mrope"}}, "rope_scaling rope_type 'mrope' is not one of default, linear"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -1}}, "rope_parameters: rope_theta must be >= 0"),
        ({"rope_theta": "1e4"}, 'rope_theta must be a number, got "1e4"'),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 (partial RoPE) is not supported"),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}}, "partial_rotary_factor=0.25"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "x"}}, 'rope_scaling: factor must be a number, got "x"'),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": -1}}, "low_freq_factor must be >= 0"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 4096.5}},
            "original_max_position_embeddings must be an integer",
        ),
        ({"rope_scaling": {"rope_type": "longrope", "long_factor": [1, "a"]}}, "long_factor must be a list of numbers"),
    ],
)
def test_attention_fields_are_checked(change, message):
    with pytest.raises(UserError) as error:
        shape_from_config_dict({**LLAMA, **change}, source="c.json")
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "change,windows",
    [
        ({"model_type": "mistral", "sliding_window": 8}, (8, 8)),
        ({"model_type": "mistral", "sliding_window": None}, ()),
        ({"model_type": "llama", "sliding_window": 8, "use_sliding_window": True}, ()),  # Llama has no window
        ({"model_type": "qwen2", "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 0}, ()),
        ({"model_type": "qwen3", "sliding_window": 8, "use_sliding_window": True, "max_window_layers": 1}, (0, 8)),
        ({"model_type": "qwen3", "sliding_window": 8, "use_sliding_window": True}, ()),  # max_window_layers 28
        (
            {
                "model_type": "qwen2",
                "sliding_window": 8,
                "use_sliding_window": True,
                "layer_types": ["sliding_attention", "full_attention"],
            },
            (8, 0),
        ),  # fmt: skip
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_theta": 500000.0}, ()),
    ],
)
def test_windows_as_transformers_applies_them(change, windows):
    assert shape_from_config_dict({**LLAMA, **change}).layer_windows == windows


def test_window_overrides():
    shape = shape_from_config_dict({**LLAMA, "model_type": "mistral", "sliding_window": 8})
    assert apply_overrides(shape, ["sliding_window=0"]).layer_windows == ()
    assert apply_overrides(shape, ["n_layers=5"]).layer_windows == (8,) * 5
    assert apply_overrides(shape, ["sliding_window=4", "n_layers=3"]).layer_windows == (4, 4, 4)
    assert apply_overrides(shape, ["sliding_window=0"]).windowed == ""
    assert shape.windowed == "window 8 in 2 of 2 layers"
    mixed = shape_from_config_dict({**LLAMA, "model_type": "qwen2", "sliding_window": 8, "use_sliding_window": True,
                                    "max_window_layers": 1})  # fmt: skip
    with pytest.raises(UserError, match="different windows by layer: give sliding_window with n_layers"):
        apply_overrides(mixed, ["n_layers=4"])
    with pytest.raises(UserError, match="a window is >= 0 tokens"):
        apply_overrides(shape, ["sliding_window=-1"])


def test_a_local_model_folder_is_checked_before_it_loads(tmp_path):
    from hhbench.models.loader import load_model

    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64, "rms_norm_eps": "1e-6"}')
    with pytest.raises(UserError, match=r"config.json: rms_norm_eps must be a number, got \"1e-6\""):
        load_model(str(tmp_path))


@pytest.mark.parametrize("value,message", [(1.0, "attention_dropout must be below 1, got 1.0"), (-0.1, ">= 0")])
def test_attention_dropout_range(value, message):
    with pytest.raises(UserError, match=message):
        shape_from_config_dict({**LLAMA, "attention_dropout": value})
