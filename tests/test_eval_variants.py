"""Variant names -> layer plans, and the comparison table against layer:3:1."""

import dataclasses
import json

import pandas as pd
import pytest
from scipy.stats import binomtest

from hhbench.errors import UserError
from hhbench.eval.quality import comparison_frame, comparison_table, interval
from hhbench.models.variants import HEAD_CHOICES, parse_variant, parse_variants
from hhbench.rows.schema import ERROR, EvalRow
from hhbench.spec.shapes import PRESETS

SMOL = PRESETS["smollm2-135m"]


def test_teacher_head_and_layer_variants():
    assert parse_variant("teacher").plan(SMOL) is None
    head = parse_variant("head:7:1")
    assert head.label == "head:7:1" and parse_variant("head:7:1:uniform") == head
    plan = head.plan(SMOL)
    assert plan.ratio_effective == "118:17" and all(layer.n_fa >= 1 for layer in plan.layers)
    layer = parse_variant("layer:3:1").plan(SMOL)
    assert [entry.n_fa for entry in layer.layers[:8]] == [0, 0, 0, 9, 0, 0, 0, 9]
    assert parse_variant("la").plan(SMOL).fa_heads == 0
    assert parse_variant("head:0:1").plan(SMOL).la_heads == 0


def test_random_heads_keep_the_uniform_counts_and_follow_the_seed():
    uniform = parse_variant("head:7:1").plan(SMOL)
    one = parse_variant("head:7:1:random:1").plan(SMOL)
    assert parse_variant("head:7:1:random").label == "head:7:1:random:0"
    assert [a.n_fa for a in one.layers] == [a.n_fa for a in uniform.layers]
    assert one.layers == parse_variant("head:7:1:random:1").plan(SMOL).layers
    assert one.layers != parse_variant("head:7:1:random:2").plan(SMOL).layers


def test_head_maps_from_a_file_and_selected(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"fa_heads": [[0, 4]] * SMOL.n_layers}))
    mapped = parse_variant(f"head:7:1:map={path}")
    assert mapped.label == f"head:7:1:map={path}"
    assert all(layer.fa_heads == (0, 4) for layer in mapped.plan(SMOL).layers)
    selected = parse_variant("head:7:1:selected")
    assert selected.plan(SMOL, str(path)).layers == mapped.plan(SMOL).layers
    with pytest.raises(UserError, match="--head-map"):
        selected.plan(SMOL)


@pytest.mark.parametrize(
    "text", ["head", "head:7", "head:x:1", "layer:3:1:random", "head:7:1:nosuch", "head:7:1:random:x", "vanilla",
             "head:7:1:map=/no/such.json", "head:7:1:uniform:3"],
)  # fmt: skip
def test_bad_variants_are_one_line_errors(text):
    with pytest.raises(UserError):
        parse_variant(text)


def test_one_rule_for_repeats_and_extensibility(tmp_path):
    texts = ["teacher", "head:14:2", "layer:6:2", "head:7:1:uniform", "layer:3:1", "teacher", "head:6:2:random:1"]
    assert [v.label for v in parse_variants(texts)] == ["teacher", "head:7:1", "layer:3:1", "head:3:1:random:1"]
    assert parse_variant("layer:6:2").plan(SMOL) == parse_variant("layer:3:1").plan(SMOL)
    students = [f"layer:3:1@{tmp_path}/a/r", f"layer:6:2@{tmp_path}/a/../a/r"]
    assert [v.label for v in parse_variants(students)] == ["layer:3:1@r"]
    with pytest.raises(UserError, match="names two students"):
        parse_variants([f"layer:3:1@{tmp_path}/a/r", f"layer:3:1@{tmp_path}/b/r"])
    assert {"uniform", "random", "map", "selected"} <= set(HEAD_CHOICES)


def row(variant, task, context, value, metric="acc", status="ok"):
    return EvalRow(model="m", variant=variant, task=task, context=context, metric=metric, value=value,
                   samples=10, status=status)  # fmt: skip


def test_comparison_against_layer_3_1():
    rows = [
        row("teacher", "passkey", 1024, 1.0),
        row("head:7:1", "passkey", 1024, 0.5),
        row("layer:3:1", "passkey", 1024, 0.25),
        row("head:7:1", "passkey", 2048, 0.4),  # no baseline at 2k: no delta
        row("layer:3:1", "passkey", 1024, 0.3),  # a rerun replaces the earlier row
        row("teacher", "copy", 1024, 0.9, metric="prefix_frac"),  # not the primary metric
        row("head:3:1", "passkey", 1024, None, status=ERROR),
    ]
    frame = comparison_frame(rows)
    at = {(r.variant, r.context): r for r in frame.itertuples()}
    assert at[("head:7:1", 1024)].delta == pytest.approx(0.2)
    assert at[("teacher", 1024)].delta == pytest.approx(0.7)
    assert at[("layer:3:1", 1024)].delta == pytest.approx(0.0)
    assert pd.isna(at[("head:7:1", 2048)].delta)
    assert at[("head:3:1", 1024)].status == ERROR and pd.isna(at[("head:3:1", 1024)].value)
    assert "copy" not in set(frame["task"])
    table = comparison_table(rows)
    assert "against layer:3:1" in table
    assert (
        "| passkey | acc | 1k | 1.000 [0.722, 1.000] (+0.700) | 0.500 [0.237, 0.763] (+0.200) | 0.300 [0.108, 0.603] | error |"
        in table
    )
    assert comparison_table([]) == "(no eval rows)"
    without = comparison_table([r for r in rows if r.variant != "layer:3:1"])
    assert "against" not in without and "(layer:3:1 not run: no deltas)" in without
    assert "| passkey | acc | 1k | 1.000 [0.722, 1.000] | 0.500 [0.237, 0.763] | error |" in without
    # a baseline run at one length only: named, with deltas only where it has a score
    assert "against layer:3:1" in comparison_table(rows[:5])


def test_pass_rates_get_wilsons_interval_which_keeps_its_width_at_0_and_n():
    """The normal interval (±1.96 stderr) of 0/20 and 20/20 is a point; Wilson's score interval is not. Values by
    hand: center (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n), z = 1.96."""
    assert interval("acc", 0.0, 0.0, 20) == pytest.approx((0.0, 0.16113), abs=5e-5)
    assert interval("acc", 1.0, 0.0, 20) == pytest.approx((0.83887, 1.0), abs=5e-5)
    assert interval("acc", 0.95, 0.05, 20) == pytest.approx((0.76387, 0.99112), abs=5e-5)
    wilson = binomtest(19, 20).proportion_ci(confidence_level=0.95, method="wilson")  # a cross-check of the above
    assert (wilson.low, wilson.high) == pytest.approx((0.76387, 0.99112), abs=5e-5)
    assert interval("acc", 1.0, None, 1) == pytest.approx((0.20654, 1.0), abs=5e-5)  # n only: no stderr needed
    assert interval("retrieval_gain", 1.5, 0.1, 20) == pytest.approx((1.304, 1.696))  # nats: the normal interval
    assert interval("acc", 0.525, 0.1, 20) == pytest.approx((0.329, 0.721))  # partial credit: no k of n
    assert interval("retrieval_gain", 1.5, None, 20) is None and interval("acc", None, None, 20) is None
    rows = [row("layer:3:1", "passkey", 1024, 0.0), row("head:7:1", "passkey", 1024, 1.0)]
    rows = [dataclasses.replace(r, samples=20, stderr=0.0) for r in rows]
    table = comparison_table(rows)
    assert "| passkey | acc | 1k | 0.000 [0.000, 0.161] | 1.000 [0.839, 1.000] (+1.000) |" in table
    assert "Wilson's score interval for acc" in table


def test_loglikelihood_tasks_compare_on_retrieval_gain():
    rows = [
        row("teacher", "passkey_ll", 1024, 0.05, metric="answer_nll"),
        row("teacher", "passkey_ll", 1024, 2.25, metric="retrieval_gain"),
        row("layer:3:1", "passkey_ll", 1024, 0.5, metric="retrieval_gain"),
        row("head:7:1", "passkey_ll", 1024, 1.5, metric="retrieval_gain"),
    ]
    frame = comparison_frame(rows)
    assert set(frame["metric"]) == {"retrieval_gain"}
    assert frame.set_index("variant").loc["head:7:1", "delta"] == pytest.approx(1.0)
    assert "| passkey_ll | retrieval_gain | 1k | 2.250 (+1.750) | 0.500 | 1.500 (+1.000) |" in comparison_table(rows)
