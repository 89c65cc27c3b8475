#!/usr/bin/env bash
# The shared kernels overlay (../shared/gpu/kernels.tar.xz) drops tilelang/ascend/, which tilelang 0.1.15
# imports unconditionally (tilelang/cache/__init__.py); fla then fails to import on the GPU machine. This puts
# that folder, from the same wheel, into .gpu/tilelang-ascend.tar.xz; unpack it over the overlay:
#   tar xJf .gpu/kernels.tar.xz -C /tmp/site && tar xJf .gpu/tilelang-ascend.tar.xz -C /tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 tilelang==0.1.15 -d "$work"
unzip -q "$work"/tilelang-*.whl 'tilelang/ascend/*' -d "$work/site"
mkdir -p .gpu && tar -C "$work/site" -cf - tilelang/ascend | xz -T2 -6 > .gpu/tilelang-ascend.tar.xz
ls -la .gpu/tilelang-ascend.tar.xz
