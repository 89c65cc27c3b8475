#!/usr/bin/env bash
# Where the layer's time beyond its floor goes, kernel by kernel (issue 12): suites/profile-h200.toml (head 7:1 and
# layer 3:1, layer scope, 16K and 64K, prefill with fla-chunk and with FlashQLA, decode) timed with its floor, then
# each point's step profiled under torch.profiler (--profile), FlashQLA on the path. Rows and env.json go to
# $OUT/RUN (RUN default profile-h200) with the `hhbench table --kernels` view beside them (kernels.md). Needs
# `stage.sh 3` on this warm machine first; GPUS workers (default 1); LIMIT and CACHE as sweep.sh's (CACHE=floor
# after a floor-h200 sweep: its compiled kernels, minutes less).
set -uo pipefail
run=${RUN:-profile-h200}
QLA=1 bash experiments/h200/sweep.sh profile-h200 "$run" "${GPUS:-1}" --profile
PYTHONPATH=/tmp/site:/tmp/site-qla:$PWD python -m hhbench table "$OUT/$run" --kernels > "$OUT/$run/kernels.md"
head -60 "$OUT/$run/kernels.md"
