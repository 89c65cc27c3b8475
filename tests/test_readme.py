"""README's commands stay true: every command of its ```bash blocks is one the test knows, every hhbench command
parses (its subcommand and options exist, its values convert), and the cheap ones run as a user runs them.

Cheap here: `flops`, `table`, `report` and `gate`, which read committed results or nothing (about 15 s together).
The main job, the grid sweep and the model commands take minutes on a shared CPU: they are parsed only; CI runs
the main job and README's gate on it (.ci/run). The commands run in a scratch folder holding `results` (a link to
the committed runs) and `runs/cpu-cpu`, a copy of the CPU baseline that stands in for the main job's output.
"""

import re
import shlex
import shutil

import pytest
import typer

from tests.conftest import ROOT, run_cli

HHBENCH = ".venv/bin/hhbench"
RUN = {"flops", "table", "report", "gate"}
OTHER = {"bash scripts/setup.sh", "bash scripts/setup.sh --test", ".venv/bin/python -m pytest -q"}


def readme_commands() -> list[str]:
    """Each command of README's ```bash blocks: continuation lines joined, comments dropped, `&&` chains split."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.M | re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    return commands


COMMANDS = readme_commands()
HHBENCH_COMMANDS = [shlex.split(c)[1:] for c in COMMANDS if c.startswith(HHBENCH + " ")]


def test_readme_has_only_commands_that_work_after_set_up():
    assert len(HHBENCH_COMMANDS) >= 9  # the main job and an example of each of the eight commands
    assert {args[0] for args in HHBENCH_COMMANDS} == {"sweep", "eval", "distill", "select-heads", "flops", "table",
                                                       "report", "gate"}  # fmt: skip
    unknown = [c for c in COMMANDS if not c.startswith(HHBENCH + " ") and c not in OTHER]
    assert not unknown, f"README commands the test does not know (hhbench is {HHBENCH} after set-up): {unknown}"


@pytest.mark.parametrize("args", HHBENCH_COMMANDS, ids=lambda args: " ".join(args)[:60])
def test_readme_command_parses(args):
    from hhbench.cli.app import _register_commands, app

    _register_commands()
    group = typer.main.get_command(app)
    command = group.get_command(None, args[0])
    assert command is not None, f"README names an unknown command: {args[0]}"
    command.make_context(args[0], list(args[1:]))  # click raises on an unknown option or a bad value


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    (folder / "results").symlink_to(ROOT / "results")
    shutil.copytree(ROOT / "results" / "baseline-cpu", folder / "runs" / "cpu-cpu")
    return folder


@pytest.mark.parametrize("args", [a for a in HHBENCH_COMMANDS if a[0] in RUN], ids=lambda args: " ".join(args)[:60])
def test_readme_command_runs(args, scratch):
    result = run_cli(*args, cwd=scratch, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    if args[0] == "table" and len([a for a in args[1:] if not a.startswith("-")]) > 1:
        side = result.stdout.split("### Runs side by side", 1)[1]
        assert "No configuration" not in side  # the two runs share points
    if args[0] == "gate":
        assert "PASS" in result.stdout
