"""kcore.ops.apply_token_bitmask_: every backend against the torch reference (exact, bit for bit),
the reference against a numpy oracle, layouts (strided rows, padded vocab, broadcast masks),
indices, and bad input."""

import numpy as np
import pytest
import torch

import kcore
from kcore.errors import BackendUnavailableError, InvalidInputError
from kcore.ops import apply_token_bitmask_
from kcore.ops.bitmask import allocate_token_bitmask, bitmask_from_bool, bitmask_to_bool

HAS_CUDA = torch.cuda.is_available() and kcore._native.cuda_compiled()
VOCABS = (32001, 49152, 128010, 151936)
BATCHES = (1, 3, 64)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_BITS_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def device_of(backend):
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def backend_param(backend):
    marks = []
    if backend == "cuda":
        marks.append(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and kcore built with CUDA"))
    return pytest.param(backend, marks=marks, id=backend)


KERNEL_BACKENDS = [backend_param(b) for b in ("cpu", "triton", "cuda")]


def assert_same_bits(actual, expected):
    """Exact comparison that also treats NaN payloads and -0.0 as values."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    a, e = actual.cpu().view(_BITS_VIEW[actual.dtype]), expected.cpu().view(_BITS_VIEW[expected.dtype])
    if not torch.equal(a, e):
        diff = (a != e).nonzero()
        raise AssertionError(f"{diff.shape[0]} elements differ, first at {diff[0].tolist()}")


def random_bitmask(batch, vocab, seed, *, words=None):
    """Random bits, with rows 1 and 2 (when present) all allowed and all masked."""
    g = torch.Generator().manual_seed(seed)
    words = words if words is not None else (vocab + 31) // 32
    bm = torch.randint(-(2**31), 2**31 - 1, (batch, words), dtype=torch.int32, generator=g)
    if batch > 1:
        bm[1] = -1
    if batch > 2:
        bm[2] = 0
    return bm


def random_logits(batch, vocab, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g).to(dtype)


def oracle(logits, bitmask, indices=None):
    """Independent numpy implementation of the semantics (little-endian bit order per word)."""
    out = logits.float().cpu().numpy().copy()
    vocab = out.shape[1]
    bits = np.unpackbits(bitmask.cpu().numpy().astype("<i4").view(np.uint8), axis=1, bitorder="little")
    rows = range(out.shape[0]) if indices is None else indices
    for r in rows:
        out[r, bits[r, :vocab] == 0] = -np.inf
    return torch.from_numpy(out).to(logits.dtype)


def run(backend, logits, bitmask, **kw):
    out = logits.clone()
    apply_token_bitmask_(out, bitmask, backend=backend, **kw)
    return out


# ---------------------------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("vocab", (1, 31, 32, 33, 32001))
def test_torch_reference_matches_numpy_oracle(vocab):
    logits, bm = random_logits(3, vocab, torch.float32, 0), random_bitmask(3, vocab, 1)
    assert_same_bits(run("torch", logits, bm), oracle(logits, bm))
    assert_same_bits(run("torch", logits, bm, indices=[2, 0]), oracle(logits, bm, [2, 0]))


def test_bitmask_helpers_round_trip():
    g = torch.Generator().manual_seed(3)
    allowed = torch.rand(5, 1000, generator=g) < 0.3
    bm = bitmask_from_bool(allowed)
    assert bm.dtype == torch.int32 and bm.shape == (5, 32)
    assert torch.equal(bitmask_to_bool(bm, 1000), allowed)
    assert not bitmask_to_bool(bm, 1024)[:, 1000:].any()  # padding bits are 0
    full = allocate_token_bitmask(4, 1000)
    assert full.shape == (4, 32) and full.dtype == torch.int32 and full.device.type == "cpu"
    assert bitmask_to_bool(full, 1024).all()
    # Bit 31 (sign bit) and bit 0 of word 1 = tokens 31 and 32.
    one = torch.zeros(1, 64, dtype=torch.bool)
    one[0, 31] = one[0, 32] = True
    assert bitmask_from_bool(one).tolist() == [[-(2**31), 1]]
    with pytest.raises(InvalidInputError, match="vocab_size"):
        allocate_token_bitmask(1, -1)


# ---------------------------------------------------------------------------------------------
# Every backend against the reference


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_matches_reference(backend, dtype, vocab, batch):
    dev = device_of(backend)
    logits = random_logits(batch, vocab, DTYPES[dtype], seed=vocab + batch)
    bm = random_bitmask(batch, vocab, seed=batch)
    expected = run("torch", logits, bm)
    assert_same_bits(run(backend, logits.to(dev), bm.to(dev)), expected)
    if batch > 2:
        assert torch.equal(expected[1], logits[1]) and bool(torch.isneginf(expected[2]).all())


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_cpu_large_sparse_mask(dtype):
    # > 24 MiB of logits with mostly fully masked words: the C++ kernel's non-temporal store path,
    # split over threads.
    batch, vocab = 130, 128010
    logits = random_logits(batch, vocab, DTYPES[dtype], 13)
    g = torch.Generator().manual_seed(14)
    bm = bitmask_from_bool(torch.rand(batch, vocab, generator=g) < 0.002)
    bm[7] = -1
    assert_same_bits(run("cpu", logits, bm), run("torch", logits, bm))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_auto_backend(backend):
    dev = device_of(backend)
    logits, bm = random_logits(3, 1000, torch.float32, 0), random_bitmask(3, 1000, 0)
    out = logits.to(dev)
    apply_token_bitmask_(out, bm.to(dev))
    assert_same_bits(out, oracle(logits, bm))


@pytest.mark.parametrize("layout", ["padded_rows", "every_other_row", "sliced_columns"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_strided_rows(backend, layout):
    dev = device_of(backend)
    vocab, batch = 32001, 3
    big = random_logits(2 * batch, vocab + 77, torch.float16, 5).to(dev)
    view = {
        "padded_rows": big[:batch, :vocab],
        "every_other_row": big[::2, :vocab],
        "sliced_columns": big[:batch, 40 : 40 + vocab],  # row starts not 16-byte aligned
    }[layout]
    bm = random_bitmask(batch, vocab, 6).to(dev)
    before = big.clone()
    expected = oracle(view, bm)
    apply_token_bitmask_(view, bm, backend=backend)
    assert_same_bits(view, expected)
    # Nothing outside the view was written.
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[{"padded_rows": slice(0, batch), "every_other_row": slice(0, None, 2), "sliced_columns": slice(0, batch)}[layout],
            {"padded_rows": slice(0, vocab), "every_other_row": slice(0, vocab), "sliced_columns": slice(40, 40 + vocab)}[layout]] = False
    assert_same_bits(big[outside], before[outside])


@pytest.mark.parametrize("indices_kind", ["list", "numpy", "int64", "int32", "duplicates", "empty"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_indices_subset(backend, indices_kind):
    dev = device_of(backend)
    batch, vocab = 64, 49152
    logits = random_logits(batch, vocab, torch.float32, 7)
    bm = random_bitmask(batch, vocab, 8)
    rows = {"list": [5, 0, 63, 17], "numpy": [8, 1], "int64": [1, 2, 40], "int32": [3], "duplicates": [9, 9, 4, 9], "empty": []}[
        indices_kind
    ]
    if indices_kind == "list":
        indices = rows
    elif indices_kind == "numpy":
        indices = [np.int64(i) for i in rows]
    else:
        indices = torch.tensor(rows, dtype=torch.int32 if indices_kind == "int32" else torch.int64)
    out = logits.to(dev)
    apply_token_bitmask_(out, bm.to(dev), indices=indices, backend=backend)
    assert_same_bits(out, oracle(logits, bm, sorted(set(rows))))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_indices_with_fewer_bitmask_rows(backend):
    # With indices the bitmask only needs rows up to the largest index (xgrammar's rule).
    dev = device_of(backend)
    logits, bm = random_logits(8, 100, torch.float32, 1), random_bitmask(3, 100, 2)
    out = logits.to(dev)
    apply_token_bitmask_(out, bm.to(dev), indices=[2, 1], backend=backend)
    assert_same_bits(out, oracle(logits, torch.cat([bm, torch.full((5, 4), -1, dtype=torch.int32)]), [1, 2]))
    with pytest.raises(InvalidInputError, match="indices"):
        apply_token_bitmask_(logits.to(dev), bm.to(dev), indices=[3], backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_wider_bitmask_padded_vocab(backend):
    # A bitmask built for a padded vocab (e.g. 32 * 1002 tokens) on logits of 32001: extra bits
    # (here all 0 = "masked") are ignored and memory past each row is not touched.
    dev = device_of(backend)
    vocab = 32001
    big = random_logits(3, vocab + 64, torch.float32, 3).to(dev)
    logits = big[:, :vocab]
    bm = random_bitmask(3, vocab, 4, words=1010)
    bm[:, 1001:] = 0
    expected = oracle(logits, bm)
    before = big.clone()
    apply_token_bitmask_(logits, bm.to(dev), backend=backend)
    assert_same_bits(logits, expected)
    assert_same_bits(big[:, vocab:], before[:, vocab:])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_broadcast_bitmask_row(backend):
    dev = device_of(backend)
    logits = random_logits(4, 3000, torch.float32, 9)
    row = random_bitmask(1, 3000, 10)
    bm = row.expand(4, -1)  # row stride 0
    out = logits.to(dev)
    apply_token_bitmask_(out, bm.to(dev) if dev == "cpu" else row.to(dev).expand(4, -1), backend=backend)
    assert_same_bits(out, oracle(logits, row.repeat(4, 1)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_nan_and_inf_logits(backend):
    dev = device_of(backend)
    logits = torch.tensor([[float("nan"), float("nan"), float("inf"), float("-inf"), -0.0, 1.0]] * 2)
    bm = torch.tensor([[0b101010], [0b010101]], dtype=torch.int32)
    out = logits.to(dev)
    apply_token_bitmask_(out, bm.to(dev), backend=backend)
    assert_same_bits(out, oracle(logits, bm))
    assert torch.isnan(out[0, 1]) and torch.isneginf(out[0, 0])  # allowed NaN stays, masked NaN -> -inf


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_empty_shapes(backend):
    for shape in ((0, 100), (3, 0)):
        logits = torch.zeros(shape)
        apply_token_bitmask_(logits, torch.zeros(shape[0], (shape[1] + 31) // 32, dtype=torch.int32), backend=backend)


def test_torch_compile_cpu():
    logits, bm = random_logits(3, 1000, torch.float32, 11), random_bitmask(3, 1000, 12)

    def step(x, b):
        apply_token_bitmask_(x, b)
        return x * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # fake impl + functionalization
    x = logits.clone()
    y = compiled(x, bm)
    assert_same_bits(x, oracle(logits, bm))
    assert_same_bits(y, oracle(logits, bm) * 2)
    x = logits.clone().requires_grad_(False)
    version = x._version
    apply_token_bitmask_(x, bm, backend="cpu")
    assert x._version > version  # autograd sees the in-place write
    assert torch.library.opcheck(torch.ops.kcore.apply_token_bitmask_.default, (logits.clone(), bm, None, "cpu"))["test_schema"] == "SUCCESS"


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
def test_bad_input_names_the_argument(backend):
    logits, bm = torch.zeros(2, 100), torch.zeros(2, 4, dtype=torch.int32)
    bad = [
        (dict(logits=torch.zeros(2, 100, dtype=torch.float64)), "logits"),
        (dict(logits=torch.zeros(2, 100, dtype=torch.int32)), "logits"),
        (dict(logits=torch.zeros(100)), "logits"),
        (dict(logits=[[0.0] * 100]), "logits"),
        (dict(logits=torch.zeros(100, 2).t()), "last dim"),
        (dict(logits=torch.zeros(1, 100).expand(2, 100)), "overlap"),
        (dict(bitmask=torch.zeros(2, 3, dtype=torch.int32)), "ceil\\(vocab / 32\\) = 4"),
        (dict(bitmask=torch.zeros(2, 4, dtype=torch.int64)), "bitmask"),
        (dict(bitmask=torch.zeros(3, 4, dtype=torch.int32)), "bitmask must have batch"),
        (dict(bitmask=torch.zeros(2, 4, dtype=torch.int32, device="meta")), "bitmask must be on device"),
        (dict(bitmask=torch.zeros(8, 2, dtype=torch.int32).t()), "bitmask must be contiguous"),
        (dict(indices=[2]), "indices"),
        (dict(indices=[-1]), "indices"),
        (dict(indices=torch.tensor([0, 2])), "indices"),
        (dict(indices=torch.tensor([-1])), "indices"),
        (dict(indices=torch.tensor([[0]])), "indices"),
        (dict(indices=torch.tensor([0.0])), "indices"),
        (dict(indices=[0.5]), "indices"),
        (dict(indices=[True]), "indices"),
        (dict(indices="0"), "indices"),
    ]
    for override, match in bad:
        kw = dict(logits=logits.clone(), bitmask=bm, indices=None)
        kw.update(override)
        with pytest.raises(InvalidInputError, match=match):
            apply_token_bitmask_(kw["logits"], kw["bitmask"], indices=kw["indices"], backend=backend)


def test_bad_backend():
    logits, bm = torch.zeros(1, 32), torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(InvalidInputError, match="backend"):
        apply_token_bitmask_(logits, bm, backend="numpy")
    with pytest.raises(BackendUnavailableError):
        apply_token_bitmask_(logits, bm, backend="cuda")


def test_native_binding_checks_arguments():
    # The binding re-validates what Python already checked: a direct call cannot write out of bounds.
    from kcore._native import native, tensor_arg

    c = native()
    logits, bm = torch.zeros(2, 100), torch.zeros(2, 4, dtype=torch.int32)
    idx = torch.tensor([0, 5])

    def desc(t, **changes):  # a descriptor with fields replaced: data, code, shape, strides
        d = list(tensor_arg(t))
        for i, name in enumerate(("data", "code", "shape", "strides")):
            if name in changes:
                d[i] = changes[name]
        return tuple(d)

    cases = [
        ((desc(logits, code=7), desc(bm), None), "dtype"),
        ((desc(logits), desc(bm, shape=(2, 3)), None), "ceil\\(vocab / 32\\) = 4"),
        ((desc(logits, strides=(50, 1)), desc(bm), None), "row stride"),
        ((desc(logits), desc(bm, shape=(1, 4)), None), "as many rows"),
        ((desc(logits, data=0), desc(bm), None), "null"),
        ((desc(logits), desc(bm), tensor_arg(idx)), "indices\\[1\\] = 5"),
        ((desc(logits), desc(bm), desc(idx, data=0)), "null"),
        ((desc(logits, code=99), desc(bm), None), "element type code 99"),
        ((desc(logits, shape=(2, 100, 1), strides=(100, 1, 1)), desc(bm), None), "logits must have 2 dims"),
        ((desc(logits), desc(bm, code=5), None), "bitmask must have dtype"),
    ]
    for args, match in cases:
        with pytest.raises(InvalidInputError, match=match):
            c.apply_token_bitmask_cpu(*args)
    c.apply_token_bitmask_cpu(tensor_arg(logits), tensor_arg(bm), None)
    assert bool(torch.isneginf(logits).all())
