"""Head selection: probes, the two scores on a model wired by hand, the selection rule, the JSON, the CLI."""

import json
import random

import pytest
import torch
from inprocess import run_main

pytest.importorskip("transformers")

import handwired  # noqa: E402  (tests/ is on sys.path)

from hhbench.select.probes import make_probes  # noqa: E402
from hhbench.select.scores import aggregate, score_model  # noqa: E402
from hhbench.select.selection import HeadSelection, select  # noqa: E402
from hhbench.select.trace import HeadTracer, _Pass  # noqa: E402
from hhbench.spec.hybrid import HeadMap, Ratio  # noqa: E402
from hhbench.spec.shapes import PRESETS  # noqa: E402

LENGTHS = [400, 600]


@pytest.fixture(scope="module")
def hand():
    tok = handwired.tokenizer()
    return handwired.model(), (lambda text: tok.encode(text, add_special_tokens=False)), tok


def _argmax(grid) -> tuple[int, int]:
    flat = [(value, layer, head) for layer, row in enumerate(grid) for head, value in enumerate(row)]
    best = max(flat)
    assert sum(value == best[0] for value, _, _ in flat) == 1, "the best head must be unique"
    return best[1], best[2]


def test_probes_are_deterministic_and_differ_only_in_the_needle_value(hand):
    _, encode, _ = hand
    probes = make_probes(encode, LENGTHS, 3, seed=0)
    assert probes == make_probes(encode, LENGTHS, 3, seed=0)
    assert probes != make_probes(encode, LENGTHS, 3, seed=1)
    for probe in probes:
        assert len(probe.clean) == len(probe.corrupt) <= probe.length
        differ = [i for i, (a, b) in enumerate(zip(probe.clean, probe.corrupt, strict=True)) if a != b]
        start, end = probe.needle
        assert differ and all(start <= i < end or i >= probe.prompt_len for i in differ)
        assert probe.split == probe.prompt_len - 1  # no separator token: the first digit differs
        assert "".join(map(str, probe.answer)) and probe.value[0] != probe.counter_value[0]


def test_the_hand_wired_copy_head_ranks_first_on_both_scores(hand):
    model, encode, _ = hand
    scores = score_model(model, make_probes(encode, LENGTHS, 2, seed=0))
    assert _argmax(scores.retrieval) == handwired.COPY_HEAD
    assert _argmax(scores.patching) == handwired.COPY_HEAD
    assert _argmax(scores.combined) == handwired.COPY_HEAD
    layer, head = handwired.COPY_HEAD
    assert scores.patching[layer][head] == pytest.approx(1.0, abs=0.01)  # it alone carries the answer
    assert scores.retrieval[layer][head] > 0.7
    assert scores.stats["probes_patching"] == 4 and scores.stats["patch_pass_max_error"] < 1e-4
    assert scores == score_model(model, make_probes(encode, LENGTHS, 2, seed=0))  # deterministic


def _random_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(handwired.vocabulary()), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=1024, bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_patching_matches_a_brute_force_patched_forward(hand):
    """The fast path (shared prefix, one row per head) against a plain forward with one head's output replaced."""
    _, encode, _ = hand
    model = _random_llama()
    probe = make_probes(encode, [400], 1, seed=3)[0]
    split = probe.split
    right, wrong = probe.clean[split + 1], probe.corrupt[split + 1]
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([probe.clean[:-1]])).logits[0]
    with HeadTracer(model) as tracer:
        result = tracer.run(probe)
        corrupt = _Pass(record_at=split)
        tracer._forward(corrupt, tracer._ids(probe.corrupt[: split + 1]), logits=1)
    assert result.ld_clean == pytest.approx((plain[split, right] - plain[split, wrong]).item(), abs=1e-4)
    assert result.ld_base == pytest.approx(result.ld_clean, abs=1e-4)
    for layer, head in [(0, 1), (1, 3), (2, 0)]:
        attn = model.model.layers[layer].self_attn

        def replace(_module, args, head=head, layer=layer):
            x = args[0].clone().view(1, -1, 4, 16)
            x[0, -1, head] = corrupt.outputs[layer][head]
            return (x.flatten(2),)

        hook = attn.o_proj.register_forward_pre_hook(replace)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([probe.clean[: split + 1]])).logits[0, -1]
        hook.remove()
        expected = (logits[right] - logits[wrong]).item()
        assert result.ld_patched[layer, head].item() == pytest.approx(expected, abs=1e-4)


def test_selection_keeps_the_budget_and_one_fa_head_per_layer():
    shape = PRESETS["smollm2-135m"]
    rng = random.Random(0)
    scores = tuple(tuple(rng.random() for _ in range(shape.n_heads)) for _ in range(shape.n_layers))
    plan = select(shape, scores, Ratio(7, 1))
    chosen = {(i, h) for i, layer in enumerate(plan.layers) for h in layer.fa_heads}
    assert len(chosen) == 34 and plan.ratio_effective == "118:17"  # round(270 / 8)
    assert all(layer.n_fa >= 1 for layer in plan.layers)
    best = {(i, max(range(shape.n_heads), key=lambda h: scores[i][h])) for i in range(shape.n_layers)}
    assert best <= chosen  # every layer's best head
    rest = chosen - best
    floor = min(scores[i][h] for i, h in rest)
    assert all(
        scores[i][h] <= floor for i in range(shape.n_layers) for h in range(shape.n_heads) if (i, h) not in chosen
    )  # fmt: skip  (the rest of the budget: the best heads model-wide)
    packed = select(shape, scores, Ratio(7, 1), kv_aware=True)
    assert packed.fa_heads == 34 and all(layer.n_fa >= 1 for layer in packed.layers)
    assert packed.kv_groups == shape.n_layers < plan.kv_groups  # 1-2 FA heads a layer fit in one KV group


def _selection(**changes) -> HeadSelection:
    shape = PRESETS["smollm2-135m"]
    rng = random.Random(1)
    grid = tuple(tuple(round(rng.random(), 6) for _ in range(shape.n_heads)) for _ in range(shape.n_layers))
    plan = select(shape, grid, Ratio(7, 1))
    fields = dict(model="smollm2-135m", n_layers=30, n_heads=9, n_kv_heads=3, ratio="7:1",
                  ratio_effective=plan.ratio_effective, kv_aware=False,
                  fa_heads=tuple(layer.fa_heads for layer in plan.layers), scores=grid, retrieval=grid, patching=grid,
                  combine="test", probes=4, lengths=(1024, 2048), seed=0, device="cpu", kv_groups=int(plan.kv_groups),
                  probe_stats={"probes_run": 8}, seconds=1.5)  # fmt: skip
    return HeadSelection(**{**fields, **changes})


def test_head_map_json_round_trips_and_flops_reads_it(tmp_path, cli):
    selection = _selection()
    path = tmp_path / "heads.json"
    selection.save(path)
    assert HeadSelection.load(path) == selection
    data = json.loads(path.read_text())
    for key in ("model", "fa_heads", "scores", "retrieval", "patching", "ratio", "ratio_effective", "probes",
                "lengths", "seed", "device", "kv_aware", "schema"):  # fmt: skip
        assert key in data, key
    head_map = HeadMap.load(path)
    assert head_map.fa_heads == selection.fa_heads and head_map.scores == selection.scores
    result = cli("flops", "--model", "smollm2-135m", "--layouts", "head", "--ratios", "7:1", "--contexts", "4k",
                 "--pass", "prefill", "--json", "--head-map", str(path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.splitlines()[0])
    assert row["fa_heads"] == 34 and row["ratio_effective"] == "118:17" and row["head_map"] == str(path)


@pytest.fixture(scope="module")
def hand_dir(tmp_path_factory, hand):
    model, _, tok = hand
    path = tmp_path_factory.mktemp("handwired")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_selects_the_copy_head_of_a_local_model(hand_dir, tmp_path, cli):
    out = tmp_path / "heads.json"
    result = cli("select-heads", "--model", str(hand_dir), "--ratio", "3:1", "--probes", "2", "--lengths", "400,600",
                 "--device", "cpu", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    selection = HeadSelection.load(out)
    layer, head = handwired.COPY_HEAD
    assert head in selection.fa_heads[layer] and selection.n_fa == 2 and selection.ratio_effective == "3:1"
    assert selection.top(1) == [handwired.COPY_HEAD] and f"{layer}.{head}: 1.000" in result.stdout
    assert selection.lengths == (400, 600) and selection.probes == 2 and selection.device == "cpu"
    again = tmp_path / "packed.json"
    result = cli("select-heads", "--from", str(out), "--ratio", "1:1", "--kv-aware", "--out", str(again))
    assert result.returncode == 0, result.stderr
    packed = HeadSelection.load(again)
    assert packed.scores == selection.scores and packed.kv_aware and packed.ratio_effective == "1:1"
    assert head in packed.fa_heads[layer] and packed.n_fa == 4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ratio", "7-1"], "bad ratio '7-1'"),
        (["--probes", "0"], "--probes must be a positive integer"),
        (["--lengths", "abc"], "bad context 'abc'"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--out", "/proc/version/heads.json"], "cannot write"),
        (["--from", "/nonexistent/heads.json"], "cannot read head selection"),
        (["--lengths", "100", "--model", "HAND"], "probe length 100 is too short"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(hand_dir, tmp_path, args, message):
    args = [str(hand_dir) if a == "HAND" else a for a in args]
    result = run_main("select-heads", "--device", "cpu", "--out", str(tmp_path / "h.json"), *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_aggregate_skips_probes_that_carry_no_signal():
    from hhbench.select.trace import ProbeResult

    flat = ProbeResult(torch.zeros(1, 2), 0, False, 1.0, 2.0, 1.0, torch.tensor([[1.0, 0.0]]))
    good = ProbeResult(torch.tensor([[2.0, 0.0]]), 2, True, 3.0, -1.0, 3.0, torch.tensor([[-1.0, 3.0]]))
    scores = aggregate([flat, good])
    assert scores.retrieval == ((1.0, 0.0),) and scores.patching == ((1.0, 0.0),)
    assert scores.combined == ((1.0, 0.0),) and scores.stats["probes_patching"] == 1


def test_the_tracer_refuses_a_sliding_window_model():
    from transformers import MistralConfig, MistralForCausalLM

    from hhbench.errors import UserError

    config = MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16)  # fmt: skip
    with pytest.raises(UserError, match=r"sliding-window attention \(window 16 in 2 of 2 layers\): the head tracer"):
        HeadTracer(MistralForCausalLM(config))
    config.sliding_window = None
    HeadTracer(MistralForCausalLM(config))  # without a window it traces


def test_a_selection_without_evidence_says_so():
    """A model that never copies the needle scores every head 0: its map is the tie order, and the summary warns."""
    from hhbench.cli.select_heads import summary

    zeros = tuple(tuple(0.0 for _ in range(9)) for _ in range(30))
    assert any("no retrieval evidence" in line for line in summary(_selection(scores=zeros), 3))
    assert not any("no retrieval evidence" in line for line in summary(_selection(), 3))
