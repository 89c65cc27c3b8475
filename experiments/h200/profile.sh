#!/usr/bin/env bash
# Where the layer's time beyond its floor goes, kernel by kernel (issue 12): suites/profile-h200.toml (head 7:1 and
# layer 3:1, layer scope, prefill and decode, 16K and 64K) timed with its floor, then each point's step profiled
# under torch.profiler (--profile), FlashQLA on the path. Rows and env.json go to $OUT/profile-h200 with the
# `hhbench table --kernels` view beside them (kernels.md). Needs `stage.sh 3` on this warm machine first;
# GPUS workers (default 1); LIMIT as sweep.sh's.
set -uo pipefail
QLA=1 bash experiments/h200/sweep.sh profile-h200 profile-h200 "${GPUS:-1}" --profile
PYTHONPATH=/tmp/site:/tmp/site-qla:$PWD python -m hhbench table "$OUT/profile-h200" --kernels \
  > "$OUT/profile-h200/kernels.md"
head -60 "$OUT/profile-h200/kernels.md"
