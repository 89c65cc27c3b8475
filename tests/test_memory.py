"""Memory formulas on cases computed by hand."""

import pytest

from hhbench.analytic.costs import analytic_costs
from hhbench.analytic.memory import kv_cache_bytes
from hhbench.spec.axes import Pass, Scope
from hhbench.spec.hybrid import GDNConfig, HybridSpec, Layout, Ratio
from hhbench.spec.layout import build_plan
from hhbench.spec.shapes import PRESETS


def costs(model, layout, ratio, context=4096, batch=1, **kw):
    plan = build_plan(PRESETS[model], HybridSpec(Layout(layout), Ratio.parse(ratio), **kw))
    return analytic_costs(plan, Pass.PREFILL, context, batch)


def test_vanilla_kv_cache():
    # 28 layers x 8 KV heads x 4096 tokens x 128 dims x (K and V) x 2 bytes = 448 MiB
    assert costs("qwen3-1.7b", "fa", "0:1").kv_cache_bytes == 28 * 8 * 4096 * 128 * 2 * 2 == 448 * 2**20


def test_kv_cache_follows_kv_groups_not_fa_heads():
    spread_out = costs("qwen3-1.7b", "head", "3:1")  # 4 FA heads in 4 groups per layer
    packed = costs("qwen3-1.7b", "head", "3:1", kv_aware=True)  # 4 FA heads in 2 groups
    layer31 = costs("qwen3-1.7b", "layer", "3:1")  # 7 FA layers x 8 groups
    assert spread_out.kv_cache_bytes == 28 * 4 * 4096 * 128 * 4
    assert packed.kv_cache_bytes == 28 * 2 * 4096 * 128 * 4 == layer31.kv_cache_bytes
    assert costs("qwen3-1.7b", "head", "3:1", batch=3).kv_cache_bytes == 3 * spread_out.kv_cache_bytes


def test_gdn_state_by_hand():
    # h32d128 at 7:1: 28 GDN heads x (128x128 fp32 state + 3 conv taps x (128+128+128) bf16)
    c = costs("h32d128", "head", "7:1", context=65536)
    assert c.state_bytes == 28 * (128 * 128 * 4 + 3 * 384 * 2)
    assert c.kv_cache_bytes == 4 * 65536 * 128 * 2 * 2
    no_conv = build_plan(PRESETS["h32d128"], HybridSpec(Layout.LA, Ratio(1, 0), GDNConfig(conv_size=0)))
    assert analytic_costs(no_conv, Pass.DECODE, 100).state_bytes == 32 * 128 * 128 * 4


def test_state_does_not_grow_with_context():
    assert (
        costs("tiny", "head", "3:1", context=128).state_bytes == costs("tiny", "head", "3:1", context=8192).state_bytes
    )


def test_weights_by_hand_for_the_vanilla_tiny_model():
    shape = PRESETS["tiny"]  # hidden 64, 4 layers, 8 heads, 4 KV, d 8, MLP 128, vocab 256, tied
    attention = 64 * (64 + 32 + 32) + 64 * 64
    block = 3 * 64 * 128 + 2 * 64
    embedding = 256 * 64 + 64
    assert costs("tiny", "fa", "0:1").weight_bytes == 2 * (4 * (attention + block) + embedding)
    assert shape.tie_embeddings


def test_kv_cache_bytes_helper():
    assert kv_cache_bytes(kv_groups=1, context=10, head_dim=4, dtype_bytes=2, batch=2) == 2 * 10 * 4 * 2 * 2


def test_per_layer_scopes_divide_the_model():
    plan = build_plan(PRESETS["qwen3-1.7b"], HybridSpec(Layout.HEAD, Ratio(7, 1)))
    model = analytic_costs(plan, Pass.PREFILL, 8192, scope=Scope.MODEL)
    layer = analytic_costs(plan, Pass.PREFILL, 8192, scope=Scope.LAYER)
    kernel = analytic_costs(plan, Pass.PREFILL, 8192, scope=Scope.KERNEL)
    assert layer.flops_attention == pytest.approx(model.flops_attention / 28)
    assert layer.flops_proj == pytest.approx(model.flops_proj / 28) and layer.flops_mlp == 0
    assert kernel.flops_total == kernel.flops_attention == layer.flops_attention
    assert layer.kv_cache_bytes == pytest.approx(model.kv_cache_bytes / 28)


def test_bytes_moved_by_hand():
    T = 32768
    plan = build_plan(PRESETS["h32d128"], HybridSpec(Layout.HEAD, Ratio(7, 1)))
    decode = analytic_costs(plan, Pass.DECODE, T, scope=Scope.KERNEL)
    fa = 2 * 4 * 128 * 2 + 4 * T * 128 * 2 * 2  # q and o of 4 heads, then the whole KV cache of 4 groups
    gdn = 28 * ((2 * 128 + 2 * 128 + 2) * 2 + 2 * 128 * 128 * 4)  # q, k, v, o, g, beta; state read and written
    assert decode.bytes_moved == fa + gdn
    prefill = analytic_costs(plan, Pass.PREFILL, T, scope=Scope.KERNEL)
    assert prefill.bytes_moved == T * (4 * 4 * 128 * 2 + 28 * (4 * 128 + 2) * 2)
    train = analytic_costs(plan, Pass.TRAIN, T, scope=Scope.KERNEL)
    assert train.bytes_moved == 3 * prefill.bytes_moved
