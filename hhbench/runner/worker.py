"""Measure one pickled point in this fresh process and print its row as the last line (sweep --isolate)."""

import json
import pickle
import sys

import torch

from hhbench.runner.point import measure_point

if __name__ == "__main__":
    with open(sys.argv[1], "rb") as handle:
        point, device, policy, crosscheck, threads = pickle.load(handle)
    if device == "cpu":  # the sweep's threads (--threads), not torch's default
        torch.set_num_threads(threads)
    row = measure_point(point, torch.device(device), policy, {}, crosscheck)
    print(json.dumps(row.to_dict()))
