#!/usr/bin/env bash
# Issue 11's evidence: the teacher and the four students, one process each (generation at batch 1 is bound by
# the host, so five processes share two GPUs), passkey and niah_single at 1K, 2K and 4K, 20 prompts a cell.
set -uo pipefail
export PYTHONPATH=/tmp/site:/tmp/site-eval:/tmp/site-gguf:$PWD
RUN=${RUN:-distill-smollm2-135m-h200-v2}
D=/tmp/hh/$RUN
i=0
for v in teacher "head:7:1:selected@$D" "head:7:1:random@$D" "head:3:1@$D" "layer:3:1@$D"; do
  CUDA_VISIBLE_DEVICES=$((i % 2)) timeout "${LIMIT:-320}" python -m hhbench eval --model smollm2-135m \
    --variants "$v" --tasks passkey,niah_single --lengths 1k,2k,4k --limit 20 --device cuda \
    --out /tmp/hh-eval --run "ev$i" > "/tmp/hh-eval-$i.log" 2>&1 &
  i=$((i + 1))
done
wait
mkdir -p "$OUT/$RUN"
cat /tmp/hh-eval/ev*/eval.jsonl > "$OUT/$RUN/eval.jsonl"
cp /tmp/hh-eval/ev1/env.json "$OUT/$RUN/eval-env.json"
for f in /tmp/hh-eval-*.log; do grep -v "it/s\]$" "$f" | tail -12; done | tee "$OUT/$RUN/eval.log"
