"""The wheel ships the top-level suites/ folder (suite TOMLs, lm-eval task files) as the subpackage hhbench.suites,
so an installed hhbench finds them from any folder (hhbench.resources.suites_dir). The rest is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["hhbench*"]), "hhbench.suites", "hhbench.suites.lm_eval"],
    package_dir={"hhbench.suites": "suites"},
)
