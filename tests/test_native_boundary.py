"""The native boundary contract (csrc/bindings/checks.h, csrc/core/dtype.h, kcore/_native.py): one
element-type table, one tensor descriptor, named argument checks, one exception translator."""

import pytest
import torch

import kcore
from kcore._native import ELEM_TYPES, dtype_code, native, tensor_arg

NAMES = ("float32", "float16", "bfloat16", "int8", "int32", "int64", "uint8", "bool")


def test_one_elem_type_table_shared_by_both_sides():
    assert native().elem_types == {name: code for code, name in enumerate(NAMES)}
    for code, name in enumerate(NAMES):
        assert dtype_code(getattr(torch, name)) == code
    assert ELEM_TYPES == {getattr(torch, n): c for c, n in enumerate(NAMES)}
    with pytest.raises(kcore.InvalidInputError, match="float64"):
        dtype_code(torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.int64, torch.bool])
def test_descriptor_round_trip_of_a_strided_view(dtype):
    base = torch.zeros(5, 7, 9, dtype=dtype)
    t = base[1:4, ::2, 3:]  # offset data pointer, stride 2 in the middle dim
    ptr, code, shape, strides, device = native().echo_tensor_arg(tensor_arg(t))
    assert ptr == t.data_ptr() != base.data_ptr()
    assert (code, shape, strides, device) == (dtype_code(dtype), (3, 4, 6), (63, 18, 1), -1)


def test_malformed_descriptors_are_refused_with_a_kcore_error():
    t = torch.zeros(2, 3)
    good = tensor_arg(t)
    bad = [
        ((good[0], 42, (2, 3), (3, 1), -1), "unknown element type code 42"),
        ((good[0], 0, (2, 3), (3,), -1), "same length"),
        ((good[0], 0, (1,) * 7, (1,) * 7, -1), "at most 6 dims"),
        ((good[0], 0, (2, -3), (3, 1), -1), "negative size"),
    ]
    for desc, match in bad:
        with pytest.raises(kcore.InvalidInputError, match=match):
            native().echo_tensor_arg(desc)


def test_checks_name_the_argument():
    logits = torch.zeros(2, 3, 4)
    dists, values = torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.int64)
    out = torch.empty(2, 3)
    with pytest.raises(kcore.InvalidInputError, match=r"logits must have 2 dims, got shape \(2, 3, 4\)"):
        native().knn_interpolate(tensor_arg(logits), tensor_arg(dists), tensor_arg(values), 0.5, 1.0, 0, tensor_arg(out))
    logits = torch.zeros(2, 3)
    with pytest.raises(kcore.InvalidInputError, match=r"values must have dtype in \(int32, int64\), got float32"):
        native().knn_interpolate(tensor_arg(logits), tensor_arg(dists), tensor_arg(dists), 0.5, 1.0, 0, tensor_arg(out))
    with pytest.raises(kcore.InvalidInputError, match="logits must be contiguous in its last dim"):
        native().knn_interpolate(tensor_arg(torch.zeros(3, 2).T), tensor_arg(dists), tensor_arg(values), 0.5, 1.0, 0,
                                 tensor_arg(out))


def test_one_exception_translator_covers_os_errors(tmp_path):
    # std::system_error (file system) -> OSError; kcore::FileFormat -> kcore.FileFormatError.
    with pytest.raises(OSError):
        native().Trie(str(tmp_path / "missing.ktrie"), False)
    junk = tmp_path / "junk.ktrie"
    junk.write_bytes(b"not a trie" * 100)
    with pytest.raises(kcore.FileFormatError):
        native().Trie(str(junk), False)
