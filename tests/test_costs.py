"""Whole-configuration FLOPs checked by hand against the conventions in docs/methods.md."""

import pytest

from hhbench.analytic.costs import analytic_costs
from hhbench.analytic.rows import analytic_rows
from hhbench.rows.schema import RowSet
from hhbench.spec.axes import Pass, Scope
from hhbench.spec.hybrid import GDNConfig, HybridSpec, Layout, Ratio
from hhbench.spec.layout import build_plan
from hhbench.spec.shapes import PRESETS
from hhbench.tables.compare import against_layer31


def c(model, layout, ratio, pass_=Pass.PREFILL, context=4096, scope=Scope.MODEL, **kw):
    plan = build_plan(PRESETS[model], HybridSpec(Layout(layout), Ratio.parse(ratio), **kw))
    return analytic_costs(plan, pass_, context, 1, scope)


def test_h32d128_head_7_1_prefill_by_hand():
    T, d = 65536, 128
    costs = c("h32d128", "head", "7:1", context=T)
    fa = 4 * 4 * T * T * d / 2
    gdn = 28 * T * (64 * (6 * d + 4 * d) + 6 * d * d)
    qkvo = 2 * T * 4096 * (3 * 4096) + 2 * T * 4096 * 4096
    gates = 2 * T * 4096 * 28 * (2 + d)
    conv = 2 * T * 28 * 3 * d * 4
    assert costs.flops_fa_core == fa and costs.flops_gdn_core == gdn
    assert costs.flops_proj == qkvo + gates + conv
    assert costs.flops_total == fa + gdn + qkvo + gates + conv, "h32d128 counts the attention layer only"
    assert costs.flops_mlp == costs.flops_lm_head == 0


def test_decode_by_hand():
    T, d = 32768, 128
    costs = c("h32d128", "head", "3:1", Pass.DECODE, T, Scope.KERNEL)
    assert costs.flops_fa_core == 4 * 8 * T * d
    assert costs.flops_gdn_core == 6 * 24 * d * d


def test_train_factors():
    prefill, train = c("tiny", "head", "3:1"), c("tiny", "head", "3:1", Pass.TRAIN)
    assert train.flops_fa_core == 3.5 * prefill.flops_fa_core
    assert train.flops_gdn_core == 3 * prefill.flops_gdn_core
    assert train.flops_mlp == 3 * prefill.flops_mlp and train.flops_proj == 3 * prefill.flops_proj
    assert "flops_fa_core" in train.flops_estimated and "flops_fa_core" not in prefill.flops_estimated


def test_model_scope_adds_mlp_and_lm_head():
    T = 1024
    costs = c("qwen3-1.7b", "fa", "0:1", context=T)
    assert costs.flops_mlp == 28 * 2 * T * 2048 * 3 * 6144
    assert costs.flops_lm_head == 2 * 2048 * 151936, "prefill computes the next token's logits only"
    assert c("qwen3-1.7b", "fa", "0:1", Pass.TRAIN, T).flops_lm_head == 3 * 2 * T * 2048 * 151936
    assert costs.flops_elementwise > 0 and costs.flops_elementwise < costs.flops_total


def test_gqa_does_not_change_core_flops():
    assert c("qwen3-1.7b", "fa", "0:1").flops_fa_core == 28 * 4 * 16 * 4096 * 4096 * 128 / 2


def test_other_gdn_widths_get_their_own_projections():
    gdn = GDNConfig(head_k_dim=64, head_v_dim=256)
    costs = c("h32d128", "la", "1:0", gdn=gdn, scope=Scope.LAYER, context=100)
    assert costs.flops_qkvo == 2 * 100 * 4096 * 32 * (64 + 64 + 256) + 2 * 100 * 32 * 256 * 4096


def test_layer31_rows_are_their_own_baseline_and_ratios_dedupe():
    specs = [
        (r, HybridSpec(layout, Ratio.parse(r))) for layout in (Layout.HEAD, Layout.LAYER) for r in ("0:1", "3:1", "1:0")
    ]
    rows = analytic_rows(PRESETS["qwen3-1.7b"], specs, [4096], [Pass.PREFILL])
    assert sorted(row.variant for row in rows) == ["fa", "head:3:1", "la", "layer:3:1"]
    by = against_layer31(RowSet(rows).frame()).set_index("variant")  # the ratios are the views'
    assert by.loc["layer:3:1", "flops_ratio"] == 1.0 and by.loc["layer:3:1", "kv_ratio"] == 1.0
    assert by.loc["fa", "kv_ratio"] == 4.0 and by.loc["la", "kv_ratio"] == 0.0
    assert by.loc["head:3:1", "flops_ratio"] == pytest.approx(1.0)


# Sliding-window attention: Mistral-7B-v0.1's config.json values (window 4096 in every layer).
MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000, "sliding_window": 4096}  # fmt: skip


@pytest.mark.parametrize("context,window", [(1, 1), (5, 3), (8, 8), (9, 8), (48, 8), (100, 7), (64, 100)])
def test_window_pairs_follow_the_mask_transformers_applies(context, window):
    """transformers masks key s for query t unless t - window < s <= t; the convention counts T^2/2 for causal
    attention (T(T+1)/2 exactly), so the windowed count is the exact one less half a key per query position."""
    import torch

    from hhbench.analytic.flops import attended, score_pairs

    t, s = torch.arange(context)[:, None], torch.arange(context)[None, :]
    exact = ((s <= t) & (s > t - window)).sum().item()
    assert score_pairs(context, window) == exact - min(context, window) / 2
    assert score_pairs(context, 0) == context * context / 2
    assert attended(context, window) == ((s <= context - 1) & (s > context - 1 - window)).sum().item()


@pytest.mark.parametrize("layout,ratio", [("fa", "0:1"), ("head", "3:1"), ("head", "7:1"), ("layer", "3:1")])
def test_mistral_window_at_32k(layout, ratio):
    from hhbench.spec.shapes import apply_overrides, shape_from_config_dict

    T, W, d = 32768, 4096, 128
    windowed = shape_from_config_dict(MISTRAL_7B, "mistral-7b")
    full = apply_overrides(windowed, ["sliding_window=0"])
    spec = HybridSpec(Layout(layout), Ratio.parse(ratio))
    plans = build_plan(windowed, spec), build_plan(full, spec)
    prefill = [analytic_costs(plan, Pass.PREFILL, T) for plan in plans]
    decode = [analytic_costs(plan, Pass.DECODE, T) for plan in plans]
    fa_heads = plans[0].fa_heads
    assert prefill[0].flops_fa_core == 4 * fa_heads * (T * W - W * W / 2) * d
    assert prefill[1].flops_fa_core / prefill[0].flops_fa_core == pytest.approx(4.27, abs=0.01)
    assert decode[1].flops_fa_core == 8 * decode[0].flops_fa_core == 8 * 4 * fa_heads * W * d
    assert decode[1].kv_cache_bytes == 8 * decode[0].kv_cache_bytes == 8 * plans[0].kv_groups * W * d * 2 * 2
    assert prefill[0].flops_gdn_core == prefill[1].flops_gdn_core and prefill[0].flops_mlp == prefill[1].flops_mlp
    short = [analytic_costs(plan, Pass.DECODE, W) for plan in plans]  # a window as long as the context: no change
    assert short[0] == short[1]


def test_windows_by_layer():
    """Qwen2 with use_sliding_window: layers from max_window_layers on (or as layer_types says) are windowed,
    and each layer is costed with its own window."""
    from hhbench.spec.shapes import shape_from_config_dict

    base = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 100, "sliding_window": 16,
            "use_sliding_window": True}  # fmt: skip
    shape = shape_from_config_dict({**base, "max_window_layers": 1})
    assert shape.layer_windows == (0, 16, 16, 16)
    types = ["sliding_attention", "full_attention"] * 2
    alternating = shape_from_config_dict({**base, "layer_types": types})
    assert alternating.layer_windows == (16, 0, 16, 0)
    T, d = 64, 16
    layer31 = analytic_costs(build_plan(alternating, HybridSpec(Layout.LAYER, Ratio(3, 1))), Pass.DECODE, T)
    assert layer31.flops_fa_core == 4 * 4 * T * d and layer31.kv_cache_bytes == 2 * T * d * 2 * 2  # layer 3: full
    shifted = shape_from_config_dict({**base, "layer_types": types[::-1]})
    layer31 = analytic_costs(build_plan(shifted, HybridSpec(Layout.LAYER, Ratio(3, 1))), Pass.DECODE, T)
    assert layer31.flops_fa_core == 4 * 4 * 16 * d and layer31.kv_cache_bytes == 2 * 16 * d * 2 * 2
    fa = analytic_costs(build_plan(alternating, HybridSpec(Layout.FA, Ratio(0, 1))), Pass.PREFILL, T)
    assert fa.flops_fa_core == 2 * 4 * 4 * (T * T / 2) * d + 2 * 4 * 4 * (T * 16 - 16 * 16 / 2) * d
    off = shape_from_config_dict({**base, "use_sliding_window": False, "layer_types": types})
    assert off.layer_windows == () and not off.windowed  # transformers drops the window without use_sliding_window
