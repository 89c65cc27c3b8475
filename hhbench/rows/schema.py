"""The one result schema: every measured or analytic point is a Row; a RowSet writes itself as JSONL, CSV and
markdown. Bump SCHEMA_VERSION when a field changes meaning or disappears (adding a field keeps it), and say in
MIGRATIONS how a row of the version before becomes one of this: committed runs stay readable."""

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from hhbench.errors import UserError
from hhbench.files import open_output, read_text, replace_whole

SCHEMA_VERSION = 2
# Columns the views compute from rows (tables.compare's layer-wise 3:1 ratios, which `hhbench flops` prints beside
# its rows): dropped where a row carries them, so that a view's output reads back as rows.
VIEW_COLUMNS = ("vs_layer31_flops", "vs_layer31_kv")
# version -> the fields it had that the next one dropped. 1 -> 2: the layer-wise 3:1 ratios left the row for the
# views (tables.compare computes them against the run's own layer:3:1 row).
MIGRATIONS = {1: VIEW_COLUMNS}

# status values
OK = "ok"  # measured
ANALYTIC = "analytic"  # cost model only, nothing measured
UNAVAILABLE = "unavailable"  # backend missing on this machine
UNSUPPORTED = "unsupported"  # backend present but refuses this point
INCORRECT = "incorrect"  # output did not match the reference: never compared
OOM = "oom"
ERROR = "error"
STATUSES = (OK, ANALYTIC, UNAVAILABLE, UNSUPPORTED, INCORRECT, OOM, ERROR)

# The configuration measured, not the ratio text that asked for it: the variant holds the normalized ratio, so a
# 3:1 row is the 6:2 row and a resumed sweep skips it whatever spelling asks again.
KEY_FIELDS = ("model", "variant", "context", "batch", "pass_", "scope", "dtype", "fa_backend", "gdn_backend", "mode",
              "head_map", "kv_aware")  # fmt: skip


def row_key(fields) -> tuple:
    """The key of a Row from its fields by name (a Row's __dict__, or Point.key_fields()): the one rule by which
    the plan drops repeated points, a resumed sweep skips measured ones and the gate pairs rows. Raises KeyError for
    a missing field."""
    return tuple(fields[name] for name in KEY_FIELDS)


@dataclass
class Row:
    """One point of a run (rows.jsonl): its configuration (the key, KEY_FIELDS), the plan it really is, its analytic
    costs (FLOPs, bytes) and, where measured, status, latency (ms), memory (bytes), throughput and errors."""

    # --- configuration: what was asked (the key of a row)
    model: str
    layout: str  # head | layer | fa | la
    ratio: str  # requested LA:FA
    context: int
    batch: int
    pass_: str  # prefill | train | decode   (serialized as "pass")
    scope: str = "model"  # kernel | layer | model
    dtype: str = "bf16"
    fa_backend: str = ""
    gdn_backend: str = ""
    mode: str = ""  # head-level execution: sequential | streams
    head_map: str = ""  # head map source, "" for the layout builder's choice
    kv_aware: bool = False
    # --- what the plan really is
    variant: str = ""  # 'head:7:1', 'layer:3:1', 'fa', 'la', ...
    ratio_effective: str = ""
    fa_heads: float = 0.0  # summed over the layers the scope covers (per average layer below model scope)
    la_heads: float = 0.0
    kv_groups: float = 0.0
    # --- analytic costs (hhbench.analytic.costs.Costs)
    flops_total: float = 0.0
    flops_attention: float = 0.0
    flops_fa_core: float = 0.0
    flops_gdn_core: float = 0.0
    flops_proj: float = 0.0
    flops_qkvo: float = 0.0
    flops_gdn_proj: float = 0.0
    flops_conv: float = 0.0
    flops_mlp: float = 0.0
    flops_lm_head: float = 0.0
    flops_elementwise: float = 0.0
    flops_estimated: str = ""
    kv_cache_bytes: float = 0.0
    state_bytes: float = 0.0
    weight_bytes: float = 0.0
    bytes_moved: float = 0.0  # analytic fewest bytes moved: arithmetic intensity = flops_total / bytes_moved
    # --- measurement
    status: str = ANALYTIC
    reason: str = ""
    device: str = ""
    timer: str = ""  # cuda-events | cuda-graph | perf_counter
    latency_ms: float | None = None  # median
    latency_p10_ms: float | None = None
    latency_p90_ms: float | None = None
    samples_ms: list[float] = field(default_factory=list)
    reps: int = 0
    compile_ms: float | None = None  # first call: compile, JIT, autotune
    peak_mem_bytes: float | None = None
    tflops: float | None = None  # flops_total / median latency
    gbps: float | None = None  # analytic bytes / median latency
    max_rel_err: float | None = None
    gdn_impl: str = ""  # the GDN implementation that ran (kernels.registry.Backend.implementation); "" without GDN
    floor_ms: float | None = None  # the point's necessary kernels timed alone, summed (hhbench.runner.measurements)
    vs_floor: float | None = None  # latency_ms / floor_ms
    extra: dict = field(default_factory=dict)
    run: str = ""
    worker: str = ""  # the launch worker that measured it (env.json "workers" holds its host and device); "" inline
    schema: int = SCHEMA_VERSION

    @property
    def key(self) -> tuple:
        """row_key of this row (KEY_FIELDS' values in order)."""
        return row_key(self.__dict__)

    def to_dict(self) -> dict:
        """The row as JSON-ready data: `pass_` written "pass", non-finite floats as null."""
        data = dataclasses.asdict(self)
        data["pass"] = data.pop("pass_")
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "Row":
        """A Row from JSON data ("pass" or "pass_"), older schema versions migrated (MIGRATIONS). Raises UserError
        for an unknown field, a value of the wrong type, or an unsupported schema version."""
        data = dict(data)
        if "pass" in data:
            data["pass_"] = data.pop("pass")
        return _from_dict(cls, data)


@dataclass
class EvalRow:
    """One long-context quality score: a model variant on a task at a context length (results/<run>/eval.jsonl)."""

    model: str  # the base model, e.g. smollm2-135m
    variant: str  # teacher | head:7:1 | head:7:1:selected | layer:3:1 | ...
    task: str  # passkey | niah_single | niah_multikey | vt | copy | an lm-eval task name
    context: int  # target prompt length in the model's own tokens
    metric: str  # the lm-eval metric, e.g. exact_match
    value: float | None = None
    stderr: float | None = None
    samples: int = 0
    prompt_tokens: list[int] = field(default_factory=list)  # each sample's prompt as the model saw it (its longest)
    status: str = OK
    reason: str = ""
    ratio_effective: str = ""
    fa_heads: float = 0.0
    la_heads: float = 0.0
    device: str = ""
    seconds: float | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)
    run: str = ""
    schema: int = SCHEMA_VERSION

    KEY_FIELDS = ("model", "variant", "task", "context", "metric")

    @property
    def key(self) -> tuple:
        """KEY_FIELDS' values in order: (model, variant, task, context, metric)."""
        return tuple(getattr(self, name) for name in self.KEY_FIELDS)

    def to_dict(self) -> dict:
        """The row as JSON-ready data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EvalRow":
        """An EvalRow from JSON data (lm-eval's NaN stderr of one sample read as none), migrated as Row.from_dict.
        Raises UserError as it does."""
        data = dict(data)
        stderr = data.get("stderr")
        if isinstance(stderr, float) and math.isnan(stderr):  # lm-eval's stderr of one sample: none to give
            data["stderr"] = None
        return _from_dict(cls, data)


def _migrated(data: dict) -> dict:
    """A row of an older schema version as one of SCHEMA_VERSION (MIGRATIONS), and a view's columns dropped."""
    version = data.get("schema")
    while type(version) is int and version in MIGRATIONS:
        data = {name: value for name, value in data.items() if name not in MIGRATIONS[version]}
        version += 1
    if version != SCHEMA_VERSION:
        raise UserError(f"row schema version {data.get('schema')} is not the supported version {SCHEMA_VERSION}")
    return {name: value for name, value in data.items() if name not in VIEW_COLUMNS} | {"schema": version}


def _from_dict(cls, data: dict):
    data = _migrated(data)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise UserError(f"row has unknown fields {sorted(unknown)} for schema {SCHEMA_VERSION}")
    for spec in dataclasses.fields(cls):
        if spec.name in data and not _fits(data[spec.name], spec.type):
            raise UserError(
                f"field {spec.name.rstrip('_')} must be {_describe(spec.type)}, got {json.dumps(data[spec.name])[:60]}"
            )
    return cls(**data)


def _fits(value, kind) -> bool:
    """Whether a JSON value is of a field's type; a float field takes finite numbers only (NaN is no measurement)."""
    if isinstance(kind, types.UnionType):  # float | None
        return any(_fits(value, option) for option in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _describe(kind) -> str:
    if isinstance(kind, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return "a list of " + {float: "finite numbers", int: "integers"}[typing.get_args(kind)[0]]
    names = {type(None): "null", float: "a finite number", int: "an integer", bool: "true or false", str: "a string"}
    return names.get(kind, "an object")


DISPLAY_COLUMNS = ["model", "variant", "ratio_effective", "fa_heads", "la_heads", "kv_groups", "context", "batch",
                   "pass", "scope", "status", "flops_total", "flops_attention", "flops_fa_core", "flops_gdn_core",
                   "flops_proj", "flops_mlp", "kv_cache_bytes", "state_bytes", "latency_ms", "latency_p10_ms", "latency_p90_ms", "floor_ms", "vs_floor", "tflops", "peak_mem_bytes"]  # fmt: skip


class RowSet(list):
    """A list of rows that writes itself as JSON lines, CSV and markdown."""

    def frame(self):
        """The rows as a pandas DataFrame, one column per field (Row's `pass_` as "pass")."""
        import pandas as pd

        return pd.DataFrame([row.to_dict() for row in self])

    def to_jsonl(self, path: str | Path) -> None:
        """Write one JSON row per line to `path`, replacing it whole (files.replace_whole: a kill or an error while
        writing leaves the old file); raises UserError for an unwritable path."""
        with replace_whole(path) as out:
            for row in self:
                out.write(json.dumps(row.to_dict()) + "\n")

    def to_csv(self, path: str | Path) -> None:
        """Write the rows as CSV to `path`, without samples_ms and extra; raises UserError for an unwritable path."""
        frame = self.frame().drop(columns=["samples_ms", "extra"], errors="ignore")
        with open_output(path, "w") as out:
            frame.to_csv(out, index=False)

    def to_markdown(self, columns: list[str] | None = None) -> str:
        """A markdown table of `columns` (default DISPLAY_COLUMNS), leaving out those no row fills."""
        frame = self.frame()
        columns = [c for c in (columns or DISPLAY_COLUMNS) if c in frame and frame[c].notna().any()]
        return markdown_table(frame[columns])


def markdown_table(frame) -> str:
    """A pipe table without the optional `tabulate` dependency; large numbers in engineering notation."""

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float):
            if value == 0:
                return "0"
            if abs(value) >= 1e5 or abs(value) < 1e-3:
                return f"{value:.4g}"
            return f"{value:.4g}" if not value.is_integer() else str(int(value))
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = ["| " + " | ".join(cell(v) for v in record) + " |" for record in frame.itertuples(index=False)]
    return "\n".join([header, rule, *lines])


def append_row(path: Path, row: "Row | EvalRow") -> None:
    """Append one row and make it durable before the next point starts: a killed sweep loses no finished row."""
    with open_output(path, "a") as out:
        out.write(json.dumps(row.to_dict()) + "\n")
        out.flush()
        os.fsync(out.fileno())


def read_rows(path: str | Path, repair: bool = False, kind: type = Row) -> RowSet:
    """Rows (or EvalRows, with kind=EvalRow) of a JSONL file. A half-written last line (a sweep killed mid-write) is
    dropped; with repair=True it is also cut from the file, and a whole last row that lacks only its newline (a file
    written by hand or by another tool) gets one, so that appending continues on a clean line. Raises UserError for
    an unreadable file or a line that is not a row."""
    path = Path(path)
    lines = read_json_lines(path, "rows")
    rows = RowSet()
    for number, _, data in lines.objects:
        try:
            rows.append(kind.from_dict(data))
        except (UserError, TypeError) as exc:
            raise UserError(f"{path}:{number}: {exc}") from None
    if lines.tail.strip() and repair:
        with open(path, "r+") as out:
            if lines.tail_is_row:
                out.seek(0, os.SEEK_END)
                out.write("\n")
            else:
                out.truncate(os.path.getsize(path) - len(lines.tail.encode()))
    return rows


@dataclass
class JsonLines:
    """A JSON-lines file read whole: its text, its objects as (line number from 1, line, object), and the text after
    its last newline (`tail`, "" where the file ends in one): a whole row that lacks only its newline (tail_is_row,
    among the objects) or a line cut short by a kill mid-write (left out)."""

    text: str
    objects: list[tuple[int, str, dict]]
    tail: str
    tail_is_row: bool


def read_json_lines(path: str | Path, what: str) -> JsonLines:
    """The JSON objects of a JSON-lines file of rows (`what` names it in messages), blank lines skipped and a line cut
    short at the end left out. Raises UserError for an unreadable file, or one line for the first other line that is
    no JSON object (path:line)."""
    text = read_text(path, what)
    *complete, tail = text.split("\n")
    whole = _parses(tail)  # a row's JSON object parses only once its closing brace, its last character, is written
    if whole:
        complete.append(tail)
    objects = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number}: not a JSON row") from None
        if not isinstance(data, dict):  # a row is an object: dict() of a string or list fails obscurely, or not at all
            raise UserError(f"{path}:{number}: not a JSON row, got {json.dumps(data)[:40]}")
        objects.append((number, line, data))
    return JsonLines(text, objects, tail, whole)


def _parses(line: str) -> bool:
    """Whether a line holds JSON (a whole row), not nothing or a row cut short."""
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return bool(line.strip())
