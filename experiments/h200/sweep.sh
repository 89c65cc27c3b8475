#!/usr/bin/env bash
# One sweep on the device machine: sweep.sh SUITE RUN GPUS [sweep options...]. Rows go to /tmp/runs/RUN (kept while
# the machine is warm: the same command resumes) and are copied to $OUT/RUN at the end. Each run compiles from cold
# caches of its own (Triton, TileLang), so wall times of two runs compare; CACHE=NAME shares /tmp/cache/NAME between
# runs instead (warm caches: time two runs after a first one has compiled). QLA=1 puts FlashQLA on the path;
# LIMIT seconds (default 540) interrupts it (SIGINT: the sweep merges what it measured and records its wall time).
# The workers' logs come back in RUN/logs/ (a worker that crashed left its Python stack there; not in RUN/shards/,
# which git ignores as a launch's working files).
# env.json names the commit that git reports in the device machine's copy, which was the session's first commit with
# later trees (results/floor-h200-v9): give HHBENCH_COMMIT=<the commit pushed to the device> on the command line.
set -uo pipefail
suite=$1 run=$2 gpus=$3; shift 3
export PYTHONPATH=/tmp/site${QLA:+:/tmp/site-qla}:$PWD
cache=/tmp/cache/${CACHE:-$run}
export TRITON_CACHE_DIR=$cache/triton TILELANG_CACHE_DIR=$cache/tilelang
mkdir -p /tmp/runs "$OUT"
timeout -s INT "${LIMIT:-540}" python -m hhbench sweep --suite "$suite" --run "$run" --out /tmp/runs --gpus "$gpus" \
  "$@" > "/tmp/runs/$run.log" 2>&1
echo "exit $?" >> "/tmp/runs/$run.log"
cat "/tmp/runs/$run.log" >> "/tmp/runs/$run/sweep.log"
rm -rf "${OUT:?}/$run" && cp -r "/tmp/runs/$run" "$OUT/" && rm -rf "$OUT/$run"/{shards,submitit,.lock}
if compgen -G "/tmp/runs/$run/shards/*.log" > /dev/null; then
  mkdir -p "$OUT/$run/logs" && cp "/tmp/runs/$run/shards/"*.log "$OUT/$run/logs/"
fi
grep -v "it/s\]$" "/tmp/runs/$run.log" | tail -15
