"""Sweep options and suite files checked up front: one line, exit 2, nothing measured."""

import pytest
from inprocess import run_main

from hhbench.errors import UserError
from hhbench.measure.timing import TimingPolicy
from hhbench.plan.grid import load_suite


@pytest.mark.parametrize(
    "options,message",
    [
        ({"min_reps": 0, "max_reps": 0}, "min_reps must be a finite number >= 1, got 0"),
        ({"min_reps": -3}, "min_reps must be a finite number >= 1, got -3"),
        ({"min_reps": 5, "max_reps": 2}, "max_reps (2) must be >= min_reps (5)"),
        ({"warmup_ms": -1.0}, "warmup_ms must be a finite number >= 0, got -1.0"),
        ({"target_ms": float("inf")}, "target_ms must be a finite number >= 0, got inf"),
        ({"target_ms": float("nan")}, "target_ms must be a finite number >= 0, got nan"),
        ({"min_reps": 2.5}, "min_reps must be an integer, got 2.5"),
        ({"max_reps": True}, "max_reps must be an integer, got True"),
        ({"warmup_ms": "100"}, "warmup_ms must be a number, got '100'"),
        ({"flush_l2": 1}, "flush_l2 must be true or false, got 1"),
        ({"graph": "no"}, "graph must be true or false, got 'no'"),
    ],
)
def test_bad_timing_options(options, message):
    with pytest.raises(UserError) as error:
        TimingPolicy(**options)
    assert str(error.value) == f"timing option {message}"


@pytest.mark.parametrize(
    "options", [{}, {"warmup_ms": 0, "target_ms": 0, "min_reps": 1, "max_reps": 1}, {"warmup_ms": 5, "graph": True}]
)
def test_good_timing_options(options):
    assert TimingPolicy(**options) == TimingPolicy(**{**TimingPolicy().__dict__, **options})


def suite(tmp_path, text: str, top: str = "") -> str:
    """A suite file: `top` (top-level keys), one [[grid]] table, then `text`."""
    path = tmp_path / "s.toml"
    path.write_text(f'name = "s"\n{top}[[grid]]\nmodels = "tiny"\ncontexts = [64]\n{text}')
    return str(path)


@pytest.mark.parametrize(
    "timing,message",
    [
        ("min_reps = 0", "[timing] min_reps must be a finite number >= 1, got 0"),
        ('min_reps = "3"', "[timing] min_reps must be an integer, got '3'"),
        ("target_ms = -5", "[timing] target_ms must be a finite number >= 0, got -5"),
        ("min_reps = 20\nmax_reps = 10", "[timing] max_reps (10) must be >= min_reps (20)"),
    ],
)
def test_bad_timing_table(tmp_path, timing, message):
    path = suite(tmp_path, f"[timing]\n{timing}\n")
    with pytest.raises(UserError) as error:
        load_suite(path, "cpu")
    assert str(error.value) == f"suite {path}: {message}"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--min-reps", "0", "--max-reps", "0"], "timing option min_reps must be a finite number >= 1, got 0"),
        (["--max-reps", "4"], "timing option max_reps (4) must be >= min_reps (10)"),
        (["--crosscheck", "-2"], "--crosscheck must be >= 0, got -2"),
        (["--batch", "x"], "bad batch 'x': expected a positive integer"),
    ],
)
def test_bad_timing_flags_are_one_line_and_nothing_runs(tmp_path, args, message):
    result = run_main("sweep", "--models", "tiny", "--contexts", "64", "--out", str(tmp_path), *args)
    assert result.returncode == 2 and result.stderr.startswith(f"hhbench: error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_timing_flags_override_a_suite_and_are_checked_with_it(cli, tmp_path):
    path = suite(tmp_path, "[timing]\nmin_reps = 2\nmax_reps = 3\n")
    result = cli("sweep", "--suite", path, "--min-reps", "5", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "max_reps (3) must be >= min_reps (5)" in result.stderr, result.stderr


GRID_KNOWN = "known are batch, contexts, dtype, fa_backend, floor, gdn_backend, gdn_chunk, head_map, kv_aware, layouts"


@pytest.mark.parametrize(
    "top,text,message",
    [
        ("", "[timng]\nmin_reps = 2\n", "unknown table [timng]: known are device, grid, name, timing"),
        ("", "[[grids]]\nmodels = 'tiny'\n", "unknown table [[grids]]: known are"),
        (
            "",
            "[timing]\nmin_rep = 2\n",
            "[timing]: unknown key 'min_rep': known are flush_l2, graph, max_reps, min_reps",
        ),
        ("", "[[grid]]\nmodels = 'tiny'\nratio = '3:1'\n", f"[[grid]] 2: unknown key 'ratio': {GRID_KNOWN}"),
        ("", "[[grid]]\nmodels = 'tiny'\n[grid.sub]\nx = 1\n", "[[grid]] 2: unknown table [sub]: known are"),
        (
            "",
            "[[grid]]\nmodels = 'tiny'\nkv_aware = 'no'\n",
            "[[grid]] 2: grid key kv_aware takes true or false, got 'no'",
        ),
        ("", "[[grid]]\nmodels = 'tiny'\nparts = 1\n", "[[grid]] 2: grid key parts takes true or false, got 1"),
        ("", "[[grid]]\nmodels = 'tiny'\nbatch = [1.5]\n", "[[grid]] 2: grid key batch takes whole numbers"),
        ("", "[[grid]]\nmodels = 'tiny'\ngdn_chunk = [32, 64]\n", "grid key gdn_chunk takes one whole number"),
        ("", "[[grid]]\nmodels = 'tiny'\nscopes = [1]\n", "[[grid]] 2: grid key scopes takes a string or a list"),
        ("", "[[grid]]\nmodels = 'tiny'\nhead_map = 3\n", "[[grid]] 2: grid key head_map takes a string or a"),
        ("", "[[grid]]\nmodels = 3\n", "[[grid]] 2: grid key models takes a string or a list of strings, got 3"),
        ("", "[[grid]]\nmodels = 'tiny'\nratios = [3]\n", "[[grid]] 2: grid key ratios takes a string"),
        ("", "[[grid]]\nmodels = 'tiny'\nset = {a = 1}\n", "[[grid]] 2: grid key set takes a string"),
        ("", "[[grid]]\nmodels = 'tiny'\ncontexts = [true]\n", "grid key contexts takes strings or whole numbers"),
        ("", "[[grid]]\nmodels = 'tiny'\ndtype = [[1]]\n", "[[grid]] 2: grid key dtype takes a string"),
        ('nmae = "x"\n', "", "unknown key 'nmae': known are device, grid, name, timing"),
        ("timing = 5\n", "", "timing must be a [timing] table, got 5"),
    ],
)
def test_unknown_or_mistyped_parts_of_a_suite(tmp_path, top, text, message):
    path = suite(tmp_path, text, top)
    with pytest.raises(UserError) as error:
        load_suite(path, "cpu")
    assert str(error.value).startswith(f"suite {path}: ") and message in str(error.value), error.value


def test_device_and_name(tmp_path):
    for text, message in (('device = "gpu"\n', "device 'gpu': choose any or cuda"), ("name = 3\n", "name must be")):
        path = tmp_path / "s.toml"
        path.write_text(text + '[[grid]]\nmodels = "tiny"\n')
        with pytest.raises(UserError, match=message):
            load_suite(str(path), "cpu")


def test_a_grid_that_is_not_tables(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\ngrid = 3\n')
    with pytest.raises(UserError) as error:
        load_suite(str(path), "cpu")
    assert str(error.value) == f"suite {path}: grid must be [[grid]] tables, got 3"


def test_the_shipped_suites_use_known_keys_only():
    import tomllib

    from hhbench.plan.grid import GRID_KEYS, SUITE_KEYS
    from hhbench.resources import suites_dir

    for path in suites_dir().glob("*.toml"):
        data = tomllib.loads(path.read_text())
        assert set(data) <= set(SUITE_KEYS), path
        assert all(set(grid) <= GRID_KEYS for grid in data["grid"]), path
        TimingPolicy(**data.get("timing", {}))
    assert len(load_suite("cpu", "cpu").points) == 60


def test_the_suites_are_found_in_a_wheel_and_in_a_checkout(tmp_path, monkeypatch):
    from hhbench import resources

    site = tmp_path / "site"
    package = site / "hhbench"
    package.mkdir(parents=True)
    monkeypatch.setattr(resources.importlib.resources, "files", lambda name: package)
    with pytest.raises(UserError, match="suites are missing"):
        resources.suites_dir()
    for folder in (site / "suites", package / "suites"):  # a checkout's top-level folder, then the wheel's copy
        folder.mkdir()
        (folder / "cpu.toml").write_text("")
        assert resources.suites_dir() == folder


def test_a_misspelt_table_stops_the_sweep_before_it_runs(cli, tmp_path):
    path = suite(tmp_path, "[timng]\nmin_reps = 2\n")
    result = cli("sweep", "--suite", path, "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "unknown table [timng]: known are device, grid, name, timing" in result.stderr
    assert not (tmp_path / "out").exists()


def test_sweep_dedupes_by_the_same_rule_as_flops(tmp_path):
    from hhbench.plan.grid import dedupe, grid_points

    one = grid_points({"models": "tiny", "ratios": "3:1", "contexts": [64], "passes": "prefill,decode"}, "cpu")
    many = {"models": "tiny,tiny", "ratios": "3:1,6:2,9:3", "contexts": [64, 64], "passes": "prefill,decode,prefill"}
    assert grid_points(many, "cpu") == one  # within one grid
    six = grid_points({"models": "tiny", "ratios": "6:2", "contexts": [64], "passes": "prefill,decode"}, "cpu")
    assert [p.identity[1] for p in six] == [p.identity[1] for p in one] and {p.ratio for p in six} == {"6:2"}
    assert dedupe(one + six) == one  # across [[grid]] tables: the first text asked wins
    path = suite(tmp_path, "[[grid]]\nmodels = 'tiny'\nratios = ['6:2']\ncontexts = [64, 64]\n")
    assert len(load_suite(path, "cpu").points) == len(grid_points({"models": "tiny", "contexts": [64]}, "cpu"))


def test_a_point_and_its_row_share_one_key():
    from hhbench.plan.grid import grid_points
    from hhbench.runner.point import base_row

    grid = {"models": "tiny", "layouts": "head,layer,fa,la", "ratios": "6:2,7:1", "contexts": [64], "kv_aware": True,
            "passes": "prefill,decode", "scopes": ["kernel", "layer"]}  # fmt: skip
    points = grid_points(grid, "cpu")
    assert len({point.identity for point in points}) == len(points) > 8
    for point in points:
        row = base_row(point)
        assert row.key == point.identity and row.variant == point.identity[1] and row.ratio == point.ratio


def test_a_layer_wise_ratio_in_other_terms_is_the_same_plan():
    from hhbench.spec.hybrid import HybridSpec, Layout, Ratio
    from hhbench.spec.layout import build_plan
    from hhbench.spec.shapes import PRESETS

    shape = PRESETS["qwen3-1.7b"]
    for layout in (Layout.HEAD, Layout.LAYER):
        plans = [build_plan(shape, HybridSpec(layout, Ratio(3 * k, k))) for k in (1, 2, 3)]
        assert plans[0] == plans[1] == plans[2] and plans[1].spec.label == f"{layout.value}:3:1"
