#!/usr/bin/env bash
# tests/test_gpu.py on one GPU of the device machine, its log and the environment it ran in (env.json) into
# $OUT/gpu-tests-h200/. FlashQLA on the path (its tests run; fla-chunk's pinning is then tested for real).
# GPU=<index> picks the GPU (default 0); LIMIT seconds (default 420) stops it cut short, the log says so.
set -uo pipefail
export PYTHONPATH=/tmp/site:/tmp/site-qla:$PWD
export CUDA_VISIBLE_DEVICES=${GPU:-0}
dest=$OUT/gpu-tests-h200
mkdir -p "$dest"
python -c "import json, sys; from hhbench.measure.env import capture_env; \
json.dump(capture_env({'argv': sys.argv[1:]}), open('$dest/env.json', 'w'), indent=2, default=str)" \
  python -m pytest tests/test_gpu.py
timeout -s INT "${LIMIT:-420}" python -m pytest tests/test_gpu.py -v -rA --durations=0 -p no:cacheprovider \
  > "$dest/pytest.log" 2>&1
echo "exit $?" >> "$dest/pytest.log"
tail -5 "$dest/pytest.log"
