"""A run folder, results/<run>/: rows.jsonl (performance and analytic rows), eval.jsonl (quality rows) and
env.json (the machine and versions that produced them); while several workers measure it (hhbench.launch),
shards/ holds each worker's files until they are merged into rows.jsonl and env.json."""

import json
from dataclasses import dataclass
from pathlib import Path

from hhbench.errors import UserError
from hhbench.files import make_folder, read_json, replace_whole
from hhbench.rows.schema import EvalRow, RowSet, read_rows

ROWS, EVAL, ENV, TRAIN = "rows.jsonl", "eval.jsonl", "env.json", "train.jsonl"
SHARDS, LOCK = "shards", ".lock"


@dataclass(frozen=True)
class ShardFiles:
    """One worker's files in RUN/shards/: its rows (appended and flushed per point, as rows.jsonl inline), its
    env (host, device), the point it is measuring now (that point's error row, kept if the worker dies on it),
    its task (hhbench.launch.worker.Task, pickled) and its log (stdout and stderr of its process)."""

    folder: Path
    name: str

    @property
    def rows(self) -> Path:
        """NAME.jsonl: the worker's rows, appended and flushed per point."""
        return self.folder / f"{self.name}.jsonl"

    @property
    def env(self) -> Path:
        """NAME.env.json: the worker's host, device and versions."""
        return self.folder / f"{self.name}.env.json"

    @property
    def current(self) -> Path:
        """NAME.current.json: the point in progress, as its error row (kept as the row if the worker dies on it)."""
        return self.folder / f"{self.name}.current.json"

    @property
    def task(self) -> Path:
        """NAME.task.pkl: the worker's hhbench.launch.worker.Task, pickled."""
        return self.folder / f"{self.name}.task.pkl"

    @property
    def log(self) -> Path:
        """NAME.log: the worker process's stdout and stderr."""
        return self.folder / f"{self.name}.log"


@dataclass(frozen=True)
class RunDir:
    """A run folder results/<run>/ (module docstring) and the paths of its files."""

    path: Path

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing run: a folder holding rows.jsonl, eval.jsonl or train.jsonl (hhbench distill), or one of
        those files itself."""
        path = Path(path)
        if path.is_file() and path.name in (ROWS, EVAL, TRAIN):
            path = path.parent
        if not path.is_dir():
            raise UserError(f"no run at {path}: expected a folder with {ROWS}, {EVAL} or {TRAIN}")
        if not any((path / name).exists() for name in (ROWS, EVAL, TRAIN)):
            raise UserError(f"{path} holds none of {ROWS}, {EVAL}, {TRAIN}")
        return cls(path)

    def create(self) -> "RunDir":
        """Make the folder (and its parents) and check it is writable; raises UserError where it is not."""
        make_folder(self.path)
        return self

    @property
    def name(self) -> str:
        """The run's name: its folder's name."""
        return self.path.name

    @property
    def rows_path(self) -> Path:
        """<run>/rows.jsonl: performance and analytic rows."""
        return self.path / ROWS

    @property
    def eval_path(self) -> Path:
        """<run>/eval.jsonl: quality rows."""
        return self.path / EVAL

    @property
    def env_path(self) -> Path:
        """<run>/env.json: the machine and versions of the run."""
        return self.path / ENV

    @property
    def lock_path(self) -> Path:
        """<run>/.lock: held by the sweep or merge writing the run (hhbench.launch.lock)."""
        return self.path / LOCK

    def shard(self, name: str) -> ShardFiles:
        """The files of worker `name` in <run>/shards/."""
        return ShardFiles(self.path / SHARDS, name)

    def shard_names(self) -> list[str]:
        """The workers with rows or a point in progress in shards/, sorted."""
        folder = self.path / SHARDS
        if not folder.is_dir():
            return []
        names = {p.name.removesuffix(".current.json") for p in folder.glob("*.current.json")}
        return sorted(names | {p.stem for p in folder.glob("*.jsonl")})

    def rows(self) -> RowSet:
        """The run's Rows (read_rows; empty without rows.jsonl)."""
        return read_rows(self.rows_path) if self.rows_path.exists() else RowSet()

    def eval_rows(self) -> RowSet:
        """The run's EvalRows (read_rows; empty without eval.jsonl)."""
        return read_rows(self.eval_path, kind=EvalRow) if self.eval_path.exists() else RowSet()

    def train_rows(self) -> list[dict]:
        """The training curve of a distillation run (hhbench.distill.train.read_train_rows); [] without."""
        from hhbench.distill.train import read_train_rows

        return read_train_rows(self.path / TRAIN) if (self.path / TRAIN).exists() else []

    def env(self) -> dict:
        """env.json as a dict ({} without it). Raises UserError for an unreadable or malformed file, or one that
        holds no JSON object."""
        return read_json(self.env_path, "env", dict) if self.env_path.exists() else {}

    def write_env(self, env: dict) -> None:
        """Write `env` as env.json (indented, sorted keys), replaced whole: a kill while writing leaves the old
        env.json or the new one; raises UserError for an unwritable path."""
        with replace_whole(self.env_path) as out:
            json.dump(env, out, indent=2, sort_keys=True)
            out.write("\n")
