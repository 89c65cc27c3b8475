"""Whole-configuration FLOPs checked by hand against the conventions in README."""

import pytest

from hhbench.analytic.costs import Scope, analytic_costs
from hhbench.analytic.flops import Pass
from hhbench.analytic.rows import analytic_rows
from hhbench.spec.hybrid import GDNConfig, HybridSpec, Layout, Ratio
from hhbench.spec.layout import build_plan
from hhbench.spec.shapes import PRESETS


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
    by = {row.variant: row for row in rows}
    assert by["layer:3:1"].vs_layer31_flops == 1.0 and by["layer:3:1"].vs_layer31_kv == 1.0
    assert by["fa"].vs_layer31_kv == 4.0 and by["la"].vs_layer31_kv == 0.0
    assert by["head:3:1"].vs_layer31_flops == pytest.approx(1.0)
