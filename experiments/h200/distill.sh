#!/usr/bin/env bash
# Issue 11's evidence: four students of SmolLM2-135M, one per GPU pair slot (--parallel-variants), fla's kernels
# (no FlashQLA on the path). Resumable: the same command continues from the checkpoints.
set -uo pipefail
export PYTHONPATH=/tmp/site:/tmp/site-eval:/tmp/site-gguf:$PWD
RUN=${RUN:-distill-smollm2-135m-h200-v2}
mkdir -p /tmp/hh "$OUT/$RUN"
timeout "${LIMIT:-560}" torchrun --nproc-per-node 2 -m hhbench distill --model smollm2-135m \
  --variants head:7:1:selected,head:7:1:random,head:3:1,layer:3:1 --head-map results/select-smollm2-135m/heads.json \
  --data /tmp/doc/doc-text/train.jsonl --retrieval-ratio 0.75 --answer-ce 1 --stage1-tokens 1M --stage2-tokens 6M \
  --seq 2048 --batch 16 --train-attn --parallel-variants --checkpoint-every 16 --out /tmp/hh --run-name "$RUN" \
  2>&1 | grep -v "it/s\]$" | tee -a "$OUT/$RUN/distill.log" | tail -40
cp /tmp/hh/"$RUN"/{train.jsonl,recipe.json,env.json} "$OUT/$RUN/" 2>/dev/null
ls /tmp/hh/"$RUN"/checkpoints
