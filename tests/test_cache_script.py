"""experiments/h200/cache.sh: a sweep's compile caches carried between device sessions as parts of one archive."""

import os
import subprocess
import uuid
from pathlib import Path

from tests.conftest import ROOT

SCRIPT = ROOT / "experiments" / "h200" / "cache.sh"


def cache_sh(*args, cwd=ROOT, out=None):
    env = {**os.environ, **({"OUT": str(out)} if out else {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_cache_sh_says_its_usage_and_carries_a_cache_there_and_back(tmp_path):
    for args in ((), ("export",), ("copy", "x")):  # without a NAME it said "$2: unbound variable", exit 1
        wrong = cache_sh(*args)
        assert wrong.returncode == 2 and wrong.stderr == "usage: cache.sh export|import NAME\n", wrong.stderr
    name = f"test-{uuid.uuid4().hex[:8]}"
    cache = Path("/tmp/cache") / name
    (cache / "triton").mkdir(parents=True)
    (cache / "triton" / "kernel.cubin").write_bytes(os.urandom(1000))
    try:
        out = tmp_path / "out"
        out.mkdir()
        assert cache_sh("export", name, out=out).returncode == 0
        carried = tmp_path / "repo" / ".gpu" / f"cache-{name}"
        carried.mkdir(parents=True)
        for part in out.iterdir():
            (carried / part.name).write_bytes(part.read_bytes())
        kept = (cache / "triton" / "kernel.cubin").read_bytes()
        (cache / "triton" / "kernel.cubin").unlink()
        assert cache_sh("import", name, cwd=tmp_path / "repo").returncode == 0
        assert (cache / "triton" / "kernel.cubin").read_bytes() == kept
    finally:
        subprocess.run(["rm", "-rf", str(cache)], check=True)
