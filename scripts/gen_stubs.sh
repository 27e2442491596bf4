#!/usr/bin/env bash
# Regenerates kcore/_C.pyi (type stubs of the extension, shipped in the wheel with kcore/py.typed)
# from the built extension with pybind11-stubgen. Run after changing csrc/bindings/, in the venv
# of scripts/dev_build.sh; tests/test_wheel_contents.py fails while the stub and the module differ.
# CUDA-only functions (apply_token_bitmask_cuda) appear only when the extension was built with
# KCORE_CUDA=ON; otherwise the previous stub's CUDA entries are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "pybind11-stubgen>=2.5"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
python -m pybind11_stubgen kcore._C -o "$out"
python - "$out/kcore/_C.pyi" kcore/_C.pyi <<'PY'
import re, sys
new, old_path = open(sys.argv[1]).read(), sys.argv[2]
try:
    old = open(old_path).read()
except FileNotFoundError:
    old = ""
for m in re.finditer(r"^def (\w+_cuda)\(.*?(?=^def |^class |\Z)", old, re.S | re.M):
    if f"def {m.group(1)}(" not in new:
        new = new.rstrip("\n") + "\n" + m.group(0)
# TensorArg is a type caster (csrc/bindings/checks.h), not a class: name its Python form.
if "TensorArg" in new and "TensorArg: typing.TypeAlias" not in new:
    alias = ("# (data_ptr, dtype code, shape, strides in elements, device: -1 host or the CUDA index),\n"
             "# as kcore._native.tensor_arg builds it\n"
             "TensorArg: typing.TypeAlias = tuple[int, int, collections.abc.Sequence[int], "
             "collections.abc.Sequence[int], int]\n")
    new = new.replace("import typing\n", "import typing\n" + alias, 1)
open(old_path, "w").write(new)
PY
echo "wrote kcore/_C.pyi"
