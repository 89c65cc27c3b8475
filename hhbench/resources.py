"""Where hhbench's shipped data lies: the suite files (suites/*.toml) and lm-eval's task files (suites/lm_eval).

A source checkout (and an editable install) keeps them in the top-level `suites/` folder beside the package, where
users look for them; a wheel carries the same folder as the subpackage `hhbench.suites` (setup.py maps it), so an
installed hhbench finds them from any working directory.
"""

import importlib.resources
from pathlib import Path

from hhbench.errors import UserError


def suites_dir() -> Path:
    """The folder of suite TOMLs (with lm_eval/ inside): the wheel's `hhbench/suites`, else the checkout's `suites/`.

    Raises UserError (one line) where neither exists, e.g. a wheel built without the package data.
    """
    package = Path(str(importlib.resources.files("hhbench")))
    candidates = (package / "suites", package.parent / "suites")
    for folder in candidates:
        if (folder / "cpu.toml").is_file():
            return folder
    raise UserError(f"hhbench's suites are missing (looked in {' and '.join(map(str, candidates))}): reinstall hhbench")
