#!/usr/bin/env bash
# Developer build: editable install, incremental, into build/dev. CUDA off unless KCORE_CUDA=ON.
# Use inside a virtualenv made with --system-site-packages so the shared deps are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-build-isolation --no-deps -e . \
  -Cbuild-dir=build/dev -Ccmake.define.KCORE_CUDA="${KCORE_CUDA:-OFF}" -Ceditable.rebuild=false
