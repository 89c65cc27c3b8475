#!/usr/bin/env bash
# Compiles the training points' kernels (TileLang's FlashQLA backward, fla's Triton backward, hhbench's own) in
# parallel, so that a timed sweep afterwards finds them in its cache: one throwaway sweep per layout, GDN backend
# and context, all at once, each timing its point once. Compiling is CPU work and one sweep compiles one kernel at a
# time: layer 3:1's first training point with FlashQLA compiled for more than 455 s in one sweep (floor-h200-v8).
# Nothing these sweeps time is kept (rows in /tmp/warm, never copied to $OUT): the GPU runs them all at once.
# warm.sh [LIMIT seconds, default 420]; CACHE as sweep.sh's (default floor), the cache the timed sweep then uses.
# FlashQLA at two contexts: its autocp picks how to split a sequence from its length (and may compile other kernels).
# In results/floor-h200-v8 (450 s, 6 of the 9 done) it left the timed sweep's 18 training points 0.0-2.7 s of first
# call each, but fla-chunk's at 128K: 33-37 s (fla's Triton autotunes some kernels again at that length).
set -uo pipefail
limit=${1:-420}
export PYTHONPATH=/tmp/site:/tmp/site-qla:$PWD
cache=/tmp/cache/${CACHE:-floor}
export TRITON_CACHE_DIR=$cache/triton TILELANG_CACHE_DIR=$cache/tilelang
mkdir -p /tmp/warm
for variant in head:7:1 head:3:1 layer:3:1; do
  layout=${variant%%:*} ratio=${variant#*:}
  for backend_context in flash-qla:16k flash-qla:64k fla-chunk:64k; do
    backend=${backend_context%:*} context=${backend_context#*:}
    run=warm-$layout-${ratio/:/-}-$backend-$context
    timeout -s INT "$limit" python -m hhbench sweep --models qwen3-1.7b --scopes layer --passes train \
      --layouts "$layout" --ratios "$ratio" --contexts "$context" --gdn-backend "$backend" \
      --warmup-ms 0 --target-ms 0 --min-reps 1 --max-reps 1 --run "$run" --out /tmp/warm > "/tmp/warm/$run.log" 2>&1 &
  done
done
wait
for log in /tmp/warm/*.log; do echo "$(basename "$log"): $(grep -v "it/s\]$" "$log" | tail -1)"; done
du -sh "$cache"
