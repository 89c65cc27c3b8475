"""Runs named on a command line: a run folder (results/<run>/), its rows.jsonl, or any JSON-lines file of rows
(such as `hhbench flops --json > rows.jsonl`). Each run keeps a label of its own, so that rows of several runs
are compared side by side and never merged."""

from dataclasses import dataclass, field
from pathlib import Path

from hhbench.errors import UserError
from hhbench.rows.runs import RunDir
from hhbench.rows.schema import RowSet, read_rows


@dataclass
class Run:
    """One loaded run: its label, path, Rows, EvalRows, env.json and distillation curve."""

    label: str  # unique among the runs loaded together
    path: Path
    rows: RowSet
    eval_rows: RowSet = field(default_factory=RowSet)
    env: dict = field(default_factory=dict)
    train_rows: list[dict] = field(default_factory=list)  # hhbench distill's train.jsonl

    def frame(self):
        """The rows as a frame, with the run's label in `run` (a row's own `run` field may be empty)."""
        frame = self.rows.frame()
        if not frame.empty:
            frame["run"] = self.label
        return frame

    def eval_frame(self):
        """The eval rows as a frame, with the run's label in `run`."""
        frame = self.eval_rows.frame()
        if not frame.empty:
            frame["run"] = self.label
        return frame


def load_run(path: str | Path) -> Run:
    """A Run from a run folder, one of its files, or a lone rows file (labelled by its stem). Raises UserError for
    a path that holds no run or an unreadable row."""
    path = Path(path)
    if path.is_file() and path.name not in ("rows.jsonl", "eval.jsonl"):
        return Run(label=path.stem, path=path, rows=read_rows(path))
    run = RunDir.open(path)
    return Run(label=run.name, path=run.path, rows=run.rows(), eval_rows=run.eval_rows(), env=run.env(),
               train_rows=run.train_rows())  # fmt: skip


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Every run, labelled by its folder (or file) name; names that clash get their parent folders prefixed."""
    if not paths:
        raise UserError("no run given")
    runs = [load_run(path) for path in paths]
    for run in runs:
        if not run.rows and not run.eval_rows and not run.train_rows:
            raise UserError(f"{run.path} holds no rows")
    _unique_labels(runs)
    return runs


def _unique_labels(runs: list[Run]) -> None:
    resolved = [run.path.resolve() for run in runs]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise UserError(f"run {path} is given twice")
    depth = 1
    while len({run.label for run in runs}) < len(runs):
        depth += 1
        for run, path in zip(runs, resolved, strict=True):
            run.label = "/".join(path.parts[-depth:]).removesuffix(".jsonl")
