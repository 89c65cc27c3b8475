"""Measure one pickled point (or only the additions named on its finished row) in this fresh process and print its
row as the last line (sweep --isolate); before each addition of a measured point, the row so far as a line of its
own (sweep.noted_addition), which the sweep keeps if this process dies inside the addition."""

import json
import pickle
import sys

import torch

from hhbench.rows.schema import Row
from hhbench.runner.measurements import heap_frozen
from hhbench.runner.point import complete_row, measure_point
from hhbench.runner.sweep import noted_addition, noting_asked

if __name__ == "__main__":
    with open(sys.argv[1], "rb") as handle:
        point, device, policy, crosscheck, completing, threads = pickle.load(handle)
    if device == "cpu":  # the sweep's threads (--threads), not torch's default
        torch.set_num_threads(threads)

    def note(measured: Row, name: str) -> None:  # the sweep keeps this row if the process dies inside `name`
        print(json.dumps(noted_addition(measured, name).to_dict()), flush=True)

    with heap_frozen():
        if completing:
            row = complete_row(point, torch.device(device), policy, Row.from_dict(completing[0]), completing[1])
        else:
            row = measure_point(point, torch.device(device), policy, {}, crosscheck, noting_asked(point, note))
    print(json.dumps(row.to_dict()))
