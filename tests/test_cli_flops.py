"""`hhbench flops` as a user runs it."""

import json

import pandas as pd
import pytest
from inprocess import run_main


def test_table_for_the_documented_command(cli):
    result = cli("flops", "--model", "qwen3-1.7b", "--layouts", "head,layer", "--ratios", "0:1,1:1,3:1,7:1,15:1,1:0",
                 "--contexts", "4k,32k,128k,512k", "--pass", "prefill,decode")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("| qwen3-1.7b")]
    # fa, la, and head/layer x (1:1, 3:1, 7:1, 15:1): 10 variants x 2 passes x 4 contexts
    assert len(lines) == 10 * 2 * 4
    assert any("| layer:3:1 | 3:1 |" in line and line.rstrip().endswith("| 1.000 | 1.000 |") for line in lines)


def test_json_rows_carry_the_required_fields(cli):
    result = cli("flops", "--model", "smollm2-135m", "--layouts", "head", "--ratios", "7:1", "--contexts", "4096",
                 "--pass", "prefill", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 1
    row = rows[0]
    for field in ("model", "layout", "ratio", "fa_heads", "la_heads", "kv_groups", "context", "batch", "pass",
                  "flops_total", "flops_attention", "flops_fa_core", "flops_gdn_core", "flops_proj", "flops_mlp",
                  "kv_cache_bytes", "state_bytes", "vs_layer31_flops", "vs_layer31_kv", "ratio_effective"):  # fmt: skip
        assert field in row, field
    assert row["ratio"] == "7:1" and row["ratio_effective"] == "118:17" and row["fa_heads"] == 34
    assert row["flops_attention"] == row["flops_fa_core"] + row["flops_gdn_core"]
    assert row["schema"] == 2


def test_csv_output(cli, tmp_path):
    out = tmp_path / "deep" / "flops.csv"
    result = cli("flops", "--model", "tiny", "--contexts", "1k", "--csv", str(out), "--batch", "2")
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(out)
    assert set(frame["batch"]) == {2} and len(frame) == 10 * 2
    assert (frame.loc[frame["variant"] == "layer:3:1", "vs_layer31_flops"] == 1.0).all()


def test_claims_are_plain_sentences_with_numbers(cli):
    result = cli("flops", "--model", "qwen3-1.7b", "--contexts", "4k,32k,128k,512k", "--pass", "prefill", "--claims")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("qwen3-1.7b, prefill: head-level 3:1 against a vanilla block cuts")
    assert "4k: +9.5%" in lines[0] and "from 32k on" in lines[0]
    assert "head-level 7:1 against layer-wise 3:1" in lines[3] and "at no context" not in lines[3]


def test_hf_config_and_overrides(cli, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 100}))  # fmt: skip
    result = cli("flops", "--model", str(config), "--set", "n_layers=3", "--layouts", "fa", "--contexts", "16",
                 "--pass", "prefill", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.splitlines()[0])
    assert row["fa_heads"] == 12 and row["kv_groups"] == 6


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ratios", "7-1"], "bad ratio '7-1'"),
        (["--contexts", "abc"], "bad context 'abc'"),
        (["--batch", "0"], "--batch must be a positive integer"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--set", "heads=3"], "unknown model field 'heads'"),
        (["--set", "n_heads=7"], "not a multiple of n_kv_heads"),
        (["--set", "vocab=0"], "bad shape override 'vocab=0': vocab must be >= 1, got 0"),
        (["--set", "mlp_hidden=0"], "bad shape override 'mlp_hidden=0': mlp_hidden must be >= 1, got 0"),
        (["--set", "hidden=-64"], "hidden must be >= 1, got -64"),
        (["--layouts", "diagonal"], "unknown layout 'diagonal'"),
        (["--pass", "sideways"], "unknown pass 'sideways'"),
        (["--dtype", "fp64"], "unknown dtype 'fp64'"),
        (["--gdn-dk", "-64"], "GDN key head dim must be positive, got -64"),  # gave negative FLOPs and state
        (["--gdn-dv", "-1"], "GDN value head dim must be positive, got -1"),
        (["--head-map", "/nonexistent/heads.json"], "cannot read head map"),
        (["--csv", "/proc/version/x.csv"], "cannot write"),
        (["--no-such-flag"], "No such option"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run_main("flops", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_per_layer_plan_shows_kv_groups(cli):
    result = cli("flops", "--model", "qwen3-1.7b", "--layouts", "head", "--ratios", "3:1", "--kv-aware", "--plan")
    assert result.returncode == 0, result.stderr
    assert "qwen3-1.7b head:3:1+kv: ratio_effective 3:1, 112 FA heads, 56 KV groups in all" in result.stdout
    assert "| 0 | 1 | 4 5 12 13 | 4 | 12 | 2 |" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--plan", "--json"], "--plan is a view of its own: give it without --json or --csv"),
        (["--plan", "--csv", "plan.csv"], "--plan is a view of its own: give it without --json or --csv"),
        (["--claims", "--json"], "--claims is a view of its own: give it without --plan, --json or --csv"),
        (["--claims", "--csv", "claims.csv"], "--claims is a view of its own: give it without --plan, --json or --csv"),
        (["--claims", "--plan"], "--claims is a view of its own: give it without --plan, --json or --csv"),
    ],
)
def test_plan_and_claims_refuse_the_row_outputs(tmp_path, args, message):
    """--plan and --claims print a view instead of the cost rows: beside --json they printed markdown or sentences
    where JSON lines were asked for (a pipe into a JSON reader broke on its first line), beside --csv they wrote
    no CSV, and --claims hid --plan, each without a word."""
    args = [str(tmp_path / arg) if arg.endswith(".csv") else arg for arg in args]
    result = run_main("flops", "--model", "tiny", *args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    "config,message",
    [
        ("[1,2,3]", "expected a JSON object of config fields, got list"),
        ('{"hidden_size": "4096"}', 'hidden_size must be an integer, got "4096"'),
        ('{"hidden_size": 64, "num_attention_heads": -4}', "num_attention_heads must be >= 1, got -4"),
        ('{"hidden_size": 64}', "lacks 'num_attention_heads'"),
        ("\xff\xfe", "cannot read model config"),
    ],
)
def test_bad_config_json_is_one_line_naming_the_field(tmp_path, config, message):
    path = tmp_path / "c.json"
    path.write_bytes(config.encode("latin-1"))
    result = run_main("flops", "--model", str(path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_sweep_reads_config_json_through_the_same_checks(cli, tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": "2"}')
    result = cli("sweep", "--models", str(path), "--out", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert 'num_hidden_layers must be an integer, got "2"' in result.stderr


def test_sliding_window_is_modelled_and_sweep_refuses_it(cli, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32,
                                  "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                                  "vocab_size": 32000, "sliding_window": 4096}))  # fmt: skip
    rows = {}
    for window in ("4096", "0"):
        result = cli("flops", "--model", str(config), "--set", f"sliding_window={window}", "--layouts", "fa",
                     "--contexts", "32k", "--pass", "prefill,decode", "--json")  # fmt: skip
        assert result.returncode == 0, result.stderr
        rows[window] = {r["pass"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert rows["0"]["prefill"]["flops_fa_core"] / rows["4096"]["prefill"]["flops_fa_core"] == pytest.approx(4.27, 1e-3)
    assert rows["0"]["decode"]["flops_fa_core"] == 8 * rows["4096"]["decode"]["flops_fa_core"]
    assert rows["0"]["decode"]["kv_cache_bytes"] == 8 * rows["4096"]["decode"]["kv_cache_bytes"] == 4 * 2**30
    result = cli("sweep", "--models", str(config), "--out", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "sliding-window attention (window 4096 in 32 of 32 layers): sweep measures full attention" in result.stderr


def test_values_asked_twice_count_once(cli):
    """One rule with sweep: repeated contexts, passes and models count once, and a ratio is a proportion (6:2
    and 9:3 are 3:1, in both layouts), reported with the text first asked for it."""
    result = cli("flops", "--model", "tiny,tiny", "--contexts", "256,256,1k,1024", "--ratios", "3:1,6:2,9:3",
                 "--layouts", "head,layer,head", "--pass", "prefill,decode,prefill", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    keys = [(r["variant"], r["ratio"], r["pass"], r["context"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * 2 * 2
    assert {(v, ratio) for v, ratio, _, _ in keys} == {("head:3:1", "3:1"), ("layer:3:1", "3:1")}
    alone = cli("flops", "--model", "tiny", "--contexts", "1k", "--ratios", "6:2", "--layouts", "head,layer",
                "--pass", "prefill,decode", "--json")  # fmt: skip
    assert alone.returncode == 0, alone.stderr
    for row in map(json.loads, alone.stdout.splitlines()):
        same = next(r for r in rows if (r["variant"], r["pass"], r["context"]) == (row["variant"], row["pass"], 1024))
        assert row["ratio"] == "6:2" and {**row, "ratio": "3:1"} == same
    both = cli("flops", "--model", "tiny,smollm2-135m,tiny", "--contexts", "1k", "--layouts", "fa", "--json")
    assert [json.loads(line)["model"] for line in both.stdout.splitlines()] == ["tiny"] * 2 + ["smollm2-135m"] * 2
