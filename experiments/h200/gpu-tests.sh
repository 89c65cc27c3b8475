#!/usr/bin/env bash
# tests/test_gpu.py on one GPU of the device machine, its log and the environment it ran in (env.json) into
# $OUT/gpu-tests-h200/. FlashQLA on the path (its tests run; fla-chunk's pinning is then tested for real).
# GPU=<index> picks the GPU (default 0). A run cut short still logs every failure so far: each failure's short
# traceback is printed when it happens (HHBENCH_INSTAFAIL, tests/conftest.py), and the quick tests run first, the
# compile-heavy ones (FlashQLA against fla: 225 s for its first case; the layer points: over 200 s) in a second
# pytest run after them. Each test may take TIMEOUT seconds (default 300, where pytest-timeout imports: past it the
# test fails with its stack and the run goes on); both runs together LIMIT seconds (default 540, then SIGINT).
# K=<pytest -k expression> runs that selection alone instead (one pytest run). CACHE=NAME compiles into and from
# /tmp/cache/NAME (sweep.sh's CACHE): the tests then take the kernels a sweep of the same machine compiled (the same
# head dims and dtypes: fla's autotuning and TileLang's builds, minutes from cold) instead of compiling their own.
set -uo pipefail
export PYTHONPATH=/tmp/site:/tmp/site-qla:$PWD HHBENCH_INSTAFAIL=1
if [ -n "${CACHE:-}" ]; then
  export TRITON_CACHE_DIR=/tmp/cache/$CACHE/triton TILELANG_CACHE_DIR=/tmp/cache/$CACHE/tilelang
fi
export CUDA_VISIBLE_DEVICES=${GPU:-0}
dest=$OUT/gpu-tests-h200
mkdir -p "$dest"
python -c "import json, sys; from hhbench.measure.env import capture_env; \
json.dump(capture_env({'argv': sys.argv[1:]}), open('$dest/env.json', 'w'), indent=2, default=str)" \
  python -m pytest tests/test_gpu.py
slow="flash_qla or layer_points"
per_test=$(python -c "import pytest_timeout" 2>/dev/null && echo "--timeout=${TIMEOUT:-300}")
end=$((SECONDS + ${LIMIT:-540}))
selections=("not ($slow)" "$slow")
[ -n "${K:-}" ] && selections=("$K")
for selection in "${selections[@]}"; do
  left=$((end - SECONDS))
  if ((left < 10)); then echo "not run (LIMIT reached): -k '$selection'"; continue; fi
  timeout -s INT "$left" python -m pytest tests/test_gpu.py -k "$selection" -v -rfE --tb=short --durations=0 \
    -p no:cacheprovider -p no:randomly ${per_test:-}
  echo "exit $? (-k '$selection')"
done > "$dest/pytest.log" 2>&1
grep -E "^(FAILED|ERROR)|^exit|^=+ .* in [0-9.]+s" "$dest/pytest.log" | tail -12
