"""Runs named on a command line: a run folder (results/<run>/), its rows.jsonl, or any JSON-lines file of rows
(such as `hhbench flops --json > rows.jsonl`). Each run keeps a label of its own, so that rows of several runs
are compared side by side and never merged."""

from dataclasses import dataclass, field
from pathlib import Path

from hhbench.errors import UserError
from hhbench.rows.runs import RunDir
from hhbench.rows.schema import Row, RowSet, read_rows
from hhbench.spec.units import format_count


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
    a path that holds no run, an unreadable row or two rows of one configuration (by_key)."""
    path = Path(path)
    if path.is_file() and path.name not in ("rows.jsonl", "eval.jsonl"):
        run = Run(label=path.stem, path=path, rows=read_rows(path))
    else:
        folder = RunDir.open(path)
        run = Run(label=folder.name, path=folder.path, rows=folder.rows(), eval_rows=folder.eval_rows(),
                  env=folder.env(), train_rows=folder.train_rows())  # fmt: skip
    # a configuration twice (runs concatenated by hand) would be compared, plotted or gated once per copy
    by_key(run.rows, str(run.path))
    return run


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


def describe(row: Row) -> str:
    """A row's configuration as a reader names it: 'tiny head:7:1 prefill model 4k b1 fp32 sdpa/fla'."""
    parts = [row.model, row.variant or row.layout, row.pass_, row.scope, format_count(row.context), f"b{row.batch}"]
    parts += [row.dtype, "/".join(b for b in (row.fa_backend, row.gdn_backend) if b), row.mode, row.head_map]
    parts += ["kv-aware" if row.kv_aware else ""]
    return " ".join(part for part in parts if part)


def by_key(rows: RowSet, name: str) -> dict[tuple, Row]:
    """The rows by configuration key (Row.key). Raises UserError when two rows of `name` share one."""
    keyed: dict[tuple, Row] = {}
    for row in rows:
        if row.key in keyed:
            raise UserError(f"{name} has two rows for one configuration: {describe(row)}")
        keyed[row.key] = row
    return keyed
