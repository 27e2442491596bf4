#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (one H200): builds kcore with CUDA, runs the tests
# that need a GPU and the GPU benchmarks, writes everything under $OUT. Must end within 8 minutes.
# The device machine has torch, triton, pybind11, scikit-build-core, cmake, ninja and nvcc but no
# internet, so the build runs without isolation and without extra downloads.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi || true
export HF_HUB_OFFLINE=1
# Triton compiles for the GPU here, never the CPU interpreter.
export TRITON_INTERPRET=0
start=$(date +%s)
KCORE_CUDA=ON python -m pip install --no-build-isolation --no-deps -e . -Cbuild-dir=build/gpu \
  -Ccmake.define.KCORE_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 || { echo "BUILD FAILED"; exit 1; }
python -c "import kcore._C as c; assert c.cuda_compiled, 'CUDA kernels were not compiled'; print('cuda_compiled', c.cuda_compiled)"
echo "build done in $(( $(date +%s) - start )) s"

# GPU tests: the backend-vs-reference tests; they run the cuda/triton backends when a GPU exists.
# TRITON_INTERPRET stays unset here so Triton compiles for the GPU.
timeout 200 python -m pytest -q -x -m "not slow" tests -k "cuda or triton or gpu" --junitxml="$OUT/gpu_tests.xml" || echo "GPU TESTS FAILED"

# GPU benchmarks, each bounded so the whole script ends in time.
for b in benchmarks/gpu_*.py; do
  [ -f "$b" ] || continue
  timeout 90 python "$b" --out "$OUT" || echo "BENCH FAILED: $b"
done
echo "gpu_check done in $(( $(date +%s) - start )) s"
