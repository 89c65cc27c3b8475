"""experiments/h200/sweep.sh: what a sweep on the device machine brings back in $OUT, with a stand-in `python` that
leaves a launched run's files as `hhbench sweep --gpus` does."""

import os
import shutil
import subprocess
import uuid

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "experiments" / "h200" / "sweep.sh"
# the run a two-worker launch leaves: merged rows, and the launch's working files (shards with the workers' logs)
FAKE_SWEEP = """#!/usr/bin/env bash
while [ $# -gt 0 ]; do [ "$1" = --run ] && run=$2; shift; done
mkdir -p "/tmp/runs/$run/shards" "/tmp/runs/$run/submitit" && cd "/tmp/runs/$run" || exit 1
echo '{}' > rows.jsonl && echo '{}' > env.json && touch .lock submitit/job.pkl shards/gpu0.task.pkl
printf 'Fatal Python error: Segmentation fault\\n' > shards/gpu0.log && echo worker > shards/gpu1.log
"""


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git (the check of what .gitignore leaves out)")
def test_sweep_sh_brings_the_workers_logs_back_where_git_commits_them(tmp_path):
    """The workers' logs (a crashed worker's Python stack) come back in RUN/logs/, the launch's working files do
    not: in RUN/shards/ .gitignore would have kept the logs out of a committed run."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text(FAKE_SWEEP)
    (tmp_path / "bin" / "python").chmod(0o755)
    run, out = f"test-{uuid.uuid4().hex[:8]}", tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    try:
        done = subprocess.run(["bash", str(SCRIPT), "cpu", run, "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    finally:
        subprocess.run(["rm", "-rf", f"/tmp/runs/{run}", f"/tmp/runs/{run}.log"], check=True)
    assert done.returncode == 0, done.stderr
    files = sorted(str(path.relative_to(out / run)) for path in (out / run).rglob("*") if path.is_file())
    assert files == ["env.json", "logs/gpu0.log", "logs/gpu1.log", "rows.jsonl", "sweep.log"]
    committed = [f"results/{run}/{name}" for name in files]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *committed], cwd=ROOT, capture_output=True, text=True
    )
    assert ignored.stdout == "", f"git would leave out: {ignored.stdout}"
