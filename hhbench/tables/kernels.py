"""Where a profiled row's time goes, kernel by kernel (`hhbench table --kernels`): for each row of a run that holds a
profile (`sweep --profile`, extra.kernels), its longest kernels with their time, share of the kernel time, launches
and, at layer and model scope, whether the floor's parts launch them (hhbench.runner.measurements.kernel_profile)."""

import pandas as pd

from hhbench.rows.schema import Row, markdown_table
from hhbench.rows.sources import Run
from hhbench.spec.units import format_count
from hhbench.tables.host import host_bound

NAME_CHARS = 90  # a kernel name's shown length: CUDA template names run to hundreds of characters


ANONYMOUS = "(anonymous namespace)::"  # in PyTorch's kernel names (cat's): no argument list, and nothing to read


def short_name(name: str) -> str:
    """A kernel name for reading: without a leading `void `, `(anonymous namespace)::` and what follows its first
    `(` (its argument list, or a template argument's: a functor's name then ends it), at most NAME_CHARS long."""
    name = name.removeprefix("void ").replace(ANONYMOUS, "")
    if "(" in name and not name.startswith("("):
        name = name[: name.index("(")]
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "…"


def row_heading(row: Row) -> str:
    """One line naming the row and its totals: latency, floor, kernel time, host time to issue the step (where
    measured; "(host-bound)" where it is, tables.host.host_bound) and the kernel shares."""
    profile = row.extra["kernels"]
    unit = "per layer" if row.scope == "layer" else f"per {row.scope} call"
    where = f"{row.variant}, {row.pass_}, {row.scope} scope, {format_count(row.context)}, batch {row.batch}"
    backends = ", ".join(b for b in (row.fa_backend, row.gdn_impl or row.gdn_backend) if b)
    totals = [f"latency {row.latency_ms:.4g} ms"]
    if row.floor_ms is not None:
        totals.append(f"floor {row.floor_ms:.4g} ms")
    totals.append(f"kernels {profile['kernel_ms']:.4g} ms of the profiled step's {profile['step_ms']:.4g} ms "
                  f"({profile['activity']}, {unit})")  # fmt: skip
    bound = host_bound(row.extra.get("host_ms"), row.latency_ms)
    if bound is not None:  # issuing the step's launches took this long
        totals.append(f"host {row.extra['host_ms']:.4g} ms to issue it{' (host-bound)' if bound else ''}")
    shares = row.extra.get("kernel_shares")
    if shares:
        totals.append("kernel time: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    note = f"; {profile['note']}" if profile.get("note") else ""
    return f"### {where} ({backends})\n\n{'; '.join(totals)}{note}"


def kernel_frame(row: Row) -> pd.DataFrame:
    """The row's listed kernels, then `other`: name, ms, share of kernel time, launches (per the latency's unit),
    where attributed its kind and the floor parts that launch it, and where kept the hhbench functions it was
    launched from."""
    profile = row.extra["kernels"]
    total = profile["kernel_ms"]
    other = profile["other"]
    lines = [{**line, "name": short_name(line["name"])} for line in profile["top"]]
    if other["kernels"]:
        lines.append({"name": f"other ({other['kernels']} kernels)", "ms": other["ms"], "launches": other["launches"]})
    frame = pd.DataFrame(
        {
            "kernel": [line["name"] for line in lines],
            "ms": [line["ms"] for line in lines],
            "share": [f"{line['ms'] / total:.1%}" for line in lines],
            "launches": [round(line["launches"], 2) for line in lines],
        }
    )
    if "kernel_shares" in row.extra:
        frame["kind"] = [line.get("kind", "") for line in lines]
        frame["floor parts"] = [", ".join(line.get("parts", [])) for line in lines]
    if any(line.get("sites") for line in lines):  # profiles from before launch sites were kept have none
        frame["launched from"] = [_sites_text(line) for line in lines]
    return frame


def _sites_text(line: dict) -> str:
    """A listed kernel's launch sites, each with its share of the kernel's time: "hydrahead.py:359 _fused_inputs
    (80%); ..." (the module's path shortened to its file name)."""
    total = line["ms"] or 1.0
    return "; ".join(f"{site.split('/')[-1]} ({ms / total:.0%})" for site, ms in line.get("sites", []))


def kernels_table(run: Run) -> str:
    """Markdown: the run's profiled rows, each a heading (row_heading) and its kernels (kernel_frame), and the rows
    whose profile failed with why; a line saying so where no row was profiled."""
    profiled = [row for row in run.rows if "kernels" in row.extra]
    failed = [row for row in run.rows if "profile_error" in row.extra]
    if not profiled and not failed:
        return f"## Kernels: {run.label}\n\nno row of {run.path} holds a kernel profile (`hhbench sweep --profile`)\n"
    blocks = [f"## Kernels: {run.label}"]
    blocks += [f"{row_heading(row)}\n\n{markdown_table(kernel_frame(row))}" for row in profiled]
    blocks += [f"{row.variant}, {row.pass_}, {row.scope} scope, {format_count(row.context)}: profile failed: "
               f"{row.extra['profile_error']}" for row in failed]  # fmt: skip
    return "\n\n".join(blocks) + "\n"
