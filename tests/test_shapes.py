"""Model shapes read from Hugging Face configs: every field checked, published parameter counts."""

import pytest

from hhbench.errors import UserError
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
