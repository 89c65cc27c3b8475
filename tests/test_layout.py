import json

import pytest

from hhbench.errors import UserError
from hhbench.spec.hybrid import HeadMap, HybridSpec, Layout, Ratio
from hhbench.spec.layout import build_plan, even_indices, spread
from hhbench.spec.shapes import PRESETS

RATIOS = ["1:1", "3:1", "7:1", "15:1"]


def plan(model, layout, ratio, **kw):
    return build_plan(PRESETS[model], HybridSpec(Layout(layout), Ratio.parse(ratio), **kw))


@pytest.mark.parametrize("model", ["qwen3-1.7b", "llama3-8b", "smollm2-135m", "tiny", "h32d128"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_head_layout_counts(model, ratio):
    shape = PRESETS[model]
    p = plan(model, "head", ratio)
    counts = [layer.n_fa for layer in p.layers]
    r = Ratio.parse(ratio)
    expected_total = max(shape.n_layers, int(shape.n_layers * shape.n_heads * r.fa / (r.la + r.fa) + 0.5))
    assert sum(counts) == expected_total == p.fa_heads
    assert min(counts) >= 1, "HydraHead keeps at least one FA head per layer"
    assert max(counts) - min(counts) <= 1
    assert p.fa_heads + p.la_heads == shape.n_layers * shape.n_heads
    for layer in p.layers:
        assert len(set(layer.fa_heads)) == layer.n_fa and all(0 <= h < shape.n_heads for h in layer.fa_heads)
        assert set(layer.fa_heads) | set(layer.la_heads) == set(range(shape.n_heads))


def test_pure_layouts_and_normalization():
    fa, la = plan("qwen3-1.7b", "head", "0:1"), plan("qwen3-1.7b", "layer", "1:0")
    assert fa.spec.layout is Layout.FA and fa.fa_heads == 28 * 16 and fa.kv_groups == 28 * 8
    assert la.spec.layout is Layout.LA and la.fa_heads == 0 and la.kv_groups == 0
    assert fa.ratio_effective == "0:1" and la.ratio_effective == "1:0"


def test_nine_heads_at_seven_to_one_rounds_and_reports_effective_ratio():
    p = plan("smollm2-135m", "head", "7:1")
    # 30 layers x 9 heads / 8 = 33.75 -> 34 FA heads: four layers keep two.
    assert p.fa_heads == 34 and sorted(layer.n_fa for layer in p.layers).count(2) == 4
    assert p.ratio_effective == "118:17"


def test_at_least_one_fa_head_per_layer_raises_the_effective_ratio():
    p = plan("smollm2-135m", "head", "15:1")  # 270 / 16 = 16.9 < 30 layers
    assert p.fa_heads == 30 and p.ratio_effective == "8:1"


def test_layer_layout_places_fa_last_in_each_group():
    p = plan("qwen3-1.7b", "layer", "3:1")
    assert [i for i, layer in enumerate(p.layers) if layer.n_fa] == list(range(3, 28, 4))
    assert all(layer.n_fa in (0, 16) for layer in p.layers)
    seven = plan("qwen3-1.7b", "layer", "7:1")
    assert [i for i, layer in enumerate(seven.layers) if layer.n_fa] == [7, 15, 23]
    assert seven.ratio_effective == "25:3"


def test_single_layer_shape_stands_for_the_average_layer_of_a_group():
    p = plan("h32d128", "layer", "3:1")
    assert [(layer.n_fa, layer.weight) for layer in p.layers] == [(0, 0.75), (32, 0.25)]
    assert p.fa_heads == 8 and p.la_heads == 24 and p.ratio_effective == "3:1"


def test_kv_groups_and_kv_aware_packing():
    spread_out = plan("qwen3-1.7b", "head", "3:1")  # 16 heads, 8 KV groups of 2, 4 FA heads a layer
    assert spread_out.layers[0].fa_heads == (2, 6, 10, 14) and spread_out.layers[0].kv_groups == 4
    packed = plan("qwen3-1.7b", "head", "3:1", kv_aware=True)
    assert all(layer.n_fa == 4 and layer.kv_groups == 2 for layer in packed.layers)
    assert packed.kv_groups == 28 * 2
    h32 = plan("h32d128", "head", "7:1")  # no GQA: every FA head is its own group
    assert h32.layers[0].kv_groups == h32.layers[0].n_fa == 4


def test_scores_pick_global_top_k_with_one_per_layer():
    shape = PRESETS["tiny"]  # 4 layers x 8 heads; 3:1 keeps 8 FA heads
    scores = [[0.0] * 8 for _ in range(shape.n_layers)]
    scores[0] = [9.0, 8.5, 8.0, 7.5, 7.0, 6.5, 6.0, 5.5]
    for layer in range(1, 4):
        scores[layer][layer] = 1.0
    head_map = HeadMap(fa_heads=(), scores=tuple(map(tuple, scores)), source="test")
    p = build_plan(shape, HybridSpec(Layout.HEAD, Ratio(3, 1), head_map=head_map))
    assert p.layers[0].fa_heads == (0, 1, 2, 3, 4)
    assert [p.layers[i].fa_heads for i in (1, 2, 3)] == [(1,), (2,), (3,)]


def test_explicit_head_map_from_json(tmp_path):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"fa_heads": [[0], [1, 2], [7], [3]]}))
    p = build_plan(PRESETS["tiny"], HybridSpec(Layout.HEAD, Ratio(7, 1), head_map=HeadMap.load(path)))
    assert [layer.fa_heads for layer in p.layers] == [(0,), (1, 2), (7,), (3,)]
    assert p.fa_heads == 5 and p.ratio_effective == "27:5"
    path.write_text(json.dumps({"fa_heads": [[0], [9], [1], [1]]}))
    with pytest.raises(UserError, match="layer 1"):
        build_plan(PRESETS["tiny"], HybridSpec(Layout.HEAD, Ratio(7, 1), head_map=HeadMap.load(path)))
    path.write_text(json.dumps({"fa_heads": [[0]]}))
    with pytest.raises(UserError, match="1 layers"):
        build_plan(PRESETS["tiny"], HybridSpec(Layout.HEAD, Ratio(7, 1), head_map=HeadMap.load(path)))
    for index in (0.5, True, "3", -1):  # int() would take the first three
        path.write_text(json.dumps({"fa_heads": [[0], [index], [1], [2]]}))
        with pytest.raises(UserError, match="fa_heads must be lists of head indices"):
            HeadMap.load(path)


def test_distinct_layers_cover_the_model():
    for model in ("smollm2-135m", "qwen3-1.7b", "h32d128"):
        for layout in ("head", "layer"):
            p = plan(model, layout, "7:1")
            assert sum(weight for _, weight in p.distinct_layers()) == pytest.approx(PRESETS[model].n_layers)


def test_spread_helpers():
    assert spread(34, 30).count(2) == 4 and sum(spread(34, 30)) == 34
    assert even_indices(4, 16) == [2, 6, 10, 14] and even_indices(16, 16) == list(range(16))


@pytest.mark.parametrize("text", ["7-1", "7", "a:b", "0:0", "-1:1", ""])
def test_bad_ratios(text):
    with pytest.raises(UserError):
        Ratio.parse(text)
