"""Run-time CPU dispatch (csrc/core/cpu_dispatch.h): which kernel variant runs, the selection
rule, KCORE_FORCE_ISA, and every variant this CPU runs against the references.

The expected choices come from the definition of the x86-64 levels (v2: SSE4.2/POPCNT; v3: AVX2,
FMA, F16C, BMI; v4: AVX-512 F/BW/CD/DQ/VL), not from kcore; the CPU's features are checked against
/proc/cpuinfo. The full kernel test files run once per forced variant in CI (.ci/run).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from kcore._native import native
from kcore.ops import apply_token_bitmask_, knn_interpolate, knn_search, memory_attention

C = native()
FEATURES = C.cpu_features()
X86 = platform.machine() in ("x86_64", "AMD64")

V2 = ["sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "cx16"]
V3 = V2 + ["avx", "avx2", "fma", "f16c", "bmi", "bmi2", "lzcnt", "movbe"]
V4 = V3 + ["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]

# kcore's names (GCC's -m options) -> the kernel's /proc/cpuinfo flag names
CPUINFO_NAME = {
    "sse3": "pni", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "bmi": "bmi1", "lzcnt": "abm",
    "avx512bf16": "avx512_bf16", "avx512vnni": "avx512_vnni", "avx512vbmi2": "avx512_vbmi2",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bitalg": "avx512_bitalg", "avxvnni": "avx_vnni",
    "sha": "sha_ni",
}

needs_x86 = pytest.mark.skipif(not X86, reason="x86-64 variants only")
# qemu-user emulates older x86-64 CPUs (up to AVX2; no AVX-512 in its TCG): the one way to show on
# this machine that the variants chosen there run, and that no illegal instruction is reached.
QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(not (X86 and QEMU), reason="needs qemu-user (apt-get install qemu-user)")


def test_cpu_features_report_the_best_supported_variant():
    f = FEATURES
    assert f["isa"] in f["supported"]
    assert set(f["supported"]) <= set(f["variants"])
    assert set(f["variant_flags"]) == set(f["variants"])
    if os.environ.get("KCORE_FORCE_ISA"):
        assert f["chosen_by"] == "KCORE_FORCE_ISA" and f["isa"] == os.environ["KCORE_FORCE_ISA"]
    else:
        assert f["chosen_by"] == "cpuid" and f["isa"] == f["supported"][-1]


@needs_x86
def test_cpu_features_match_proc_cpuinfo():
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    with open("/proc/cpuinfo") as fh:
        flags = next(line for line in fh if line.startswith("flags")).split(":", 1)[1].split()
    expected = {n for n in FEATURES["cpu_features"] + V4 + list(CPUINFO_NAME) if CPUINFO_NAME.get(n, n) in flags}
    assert set(FEATURES["cpu_features"]) == expected


@needs_x86
def test_x86_64_variants_compiled():
    assert FEATURES["variants"][:3] == ["baseline", "avx2", "avx512"]
    assert FEATURES["variant_flags"]["baseline"] == "-march=x86-64-v2"
    assert C.build_info()["core_flags"] == "-march=x86-64"


@needs_x86
@pytest.mark.parametrize(
    "cpu, expected",
    [(V2, "baseline"), (V3, "avx2"), (V4, "avx512"), (V4 + ["avx512bf16"], "avx512"),
     (V3 + ["avx512f"], "avx2"),  # AVX-512 F alone is not x86-64-v4
     (V2 + ["avx2"], "baseline")],  # AVX2 without FMA/F16C/BMI is not x86-64-v3
)
def test_best_variant_for_cpu(cpu, expected):
    names = [v for v in FEATURES["variants"] if v != "native"]
    got = C._choose_cpu_isa("", cpu)
    assert got == expected if expected in names else got in names


@needs_x86
def test_forced_variant_for_cpu():
    assert C._choose_cpu_isa("baseline", V4) == "baseline"
    assert C._choose_cpu_isa("avx2", V4) == "avx2"
    with pytest.raises(ValueError, match=r"KCORE_FORCE_ISA=avx512 .*lacks avx512f, avx512bw, avx512cd, avx512dq, "
                                         r"avx512vl .*illegal instruction.*runs: baseline, avx2$"):
        C._choose_cpu_isa("avx512", V3)
    with pytest.raises(ValueError, match=r"KCORE_FORCE_ISA='sse9' is not a kernel variant of this build; "
                                         r"expected one of baseline, avx2, avx512"):
        C._choose_cpu_isa("sse9", V4)
    with pytest.raises(ValueError, match=r"this CPU lacks .*sse4.2.*baseline kernels \(-march=x86-64-v2\) need$"):
        C._choose_cpu_isa("", ["sse3"])
    with pytest.raises(ValueError, match="unknown CPU feature name 'avx9'"):
        C._choose_cpu_isa("", ["avx9"])


def _import_with(force: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KCORE_FORCE_ISA=force)
    code = "import kcore._C as c; f = c.cpu_features(); print(f['isa'], f['chosen_by'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("isa", FEATURES["supported"])
def test_kcore_force_isa_selects_variant(isa):
    r = _import_with(isa)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [isa, "KCORE_FORCE_ISA"]


def test_kcore_force_isa_unknown_fails_import_clearly():
    r = _import_with("avx1024")
    assert r.returncode != 0
    assert "ImportError: kcore._C: KCORE_FORCE_ISA='avx1024' is not a kernel variant of this build" in r.stderr


def test_set_cpu_isa_switches_and_rejects_unknown():
    before = C.cpu_features()["isa"]
    with pytest.raises(ValueError, match="not a kernel variant"):
        C.set_cpu_isa("avx1024")
    assert C.cpu_features()["isa"] == before
    C.set_cpu_isa(FEATURES["supported"][0])
    try:
        f = C.cpu_features()
        assert (f["isa"], f["chosen_by"]) == (FEATURES["supported"][0], "set_cpu_isa")
    finally:
        C.set_cpu_isa(before)


# ---- every variant this CPU runs gives the reference results ------------------------------------


@pytest.fixture(params=FEATURES["supported"])
def isa(request):
    before = C.cpu_features()
    C.set_cpu_isa(request.param)
    yield request.param
    C.set_cpu_isa(before["isa"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_variant_bitmask_exact(isa, dtype):
    from test_bitmask import assert_same_bits, oracle, random_bitmask, random_logits

    # 2 MiB of fp32 logits and more use threads; 24 MiB and more stream with non-temporal stores
    for batch, vocab in [(1, 32001), (3, 49152), (5, 77), (70, 128256)]:
        logits = random_logits(batch, vocab, dtype, seed=batch)
        bm = random_bitmask(batch, vocab, seed=vocab)
        out = logits.clone()
        apply_token_bitmask_(out, bm, backend="cpu")
        assert_same_bits(out, oracle(logits, bm))
        out = logits.clone()
        apply_token_bitmask_(out, bm, indices=[batch - 1], backend="cpu")
        assert_same_bits(out, oracle(logits, bm, indices=[batch - 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_variant_knn_search(isa, dtype, metric):
    from test_knn_ops import check_knn

    # 1 query (the decode path), 5 queries with dim % 32 == 0 (the AVX-512 BF16 path), odd dims
    for nq, n, d, k in [(1, 3001, 64, 16), (5, 2000, 576, 32), (3, 999, 72, 7)]:
        g = torch.Generator().manual_seed(nq * 131 + d)
        keys = torch.randn(n, d, generator=g).to(dtype)
        queries = torch.randn(nq, d, generator=g)
        dists, ids = knn_search(queries, keys, k, metric=metric, backend="cpu")
        check_knn(queries, keys.float(), k, metric, dists, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_variant_knn_interpolate(isa, dtype):
    g = torch.Generator().manual_seed(7)
    logits = (3 * torch.randn(3, 32001, generator=g)).to(dtype)
    dists = torch.rand(3, 64, generator=g) * 10
    values = torch.randint(0, 32001, (3, 64), generator=g)
    values[1, ::3] = -1
    got = knn_interpolate(logits, dists, values, lmbda=0.3, temperature=2.0, backend="cpu")
    ref = knn_interpolate(logits, dists, values, lmbda=0.3, temperature=2.0, backend="torch")
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_variant_memory_attention(isa, dtype):
    from test_memory_attention_ops import _assert_same_selection, _make, _reference, _tolerance

    for b, hq, hkv, lq, d, m, topk in [(1, 9, 3, 1, 64, 1000, 10), (2, 4, 2, 3, 80, 37, 5), (1, 8, 8, 40, 64, 300, 8)]:
        q, k, v = _make(b, hq, hkv, lq, d, m, dtype=dtype, seed=m)
        ref_out, ref_lse, ref_idx = _reference(q, k, v, topk)
        out, lse, idx = memory_attention(q, k, v, topk=topk, backend="cpu")
        _assert_same_selection(q, k, ref_idx, idx)
        tol = _tolerance(q, k, v, topk, ref_out)
        same_rows = (ref_idx.sort(-1).values == idx.sort(-1).values).all(-1)
        assert (out.float() - ref_out.float()).abs()[same_rows].max().item() <= tol
        assert (lse.float() - ref_lse.float()).abs()[same_rows].max().item() <= tol


# ---- emulated CPUs (qemu-user): Nehalem = x86-64-v2, Haswell = x86-64-v3, Core 2 below v2 -----------


def _under_qemu(model: str, code: str, timeout: float, **env) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU, "-cpu", model, sys.executable, "-c", code], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=timeout)


@needs_qemu
@pytest.mark.parametrize("model, isa", [("Nehalem", "baseline"), ("Haswell", "avx2")])
def test_emulated_cpu_gets_its_variant(model, isa):
    code = "import kcore._C as c; f = c.cpu_features(); print(f['isa'], *f['supported'])"
    r = _under_qemu(model, code, 300, KCORE_FORCE_ISA="")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == isa and r.stdout.split()[-1] == isa
    r = _under_qemu(model, code, 300, KCORE_FORCE_ISA="avx512")
    assert r.returncode != 0
    assert "ImportError: kcore._C: KCORE_FORCE_ISA=avx512 asks for kernels compiled with -march=x86-64-v4, but " \
           "this CPU lacks" in r.stderr
    assert "Illegal instruction" not in r.stderr


@needs_qemu
def test_emulated_cpu_below_baseline_fails_import_clearly():
    r = _under_qemu("core2duo", "import kcore._C", 300, KCORE_FORCE_ISA="")
    assert r.returncode != 0
    assert "ImportError: kcore._C: this CPU lacks sse4.1, sse4.2, popcnt, which kcore's baseline kernels" in r.stderr
    assert "Illegal instruction" not in r.stderr


_EMULATED_KERNELS = """
import torch, kcore._C
from kcore.ops import apply_token_bitmask_, knn_interpolate, knn_search, memory_attention
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    logits = torch.randn(3, 1000, generator=g).to(dtype)
    bm = torch.randint(-2**31, 2**31 - 1, (3, 32), dtype=torch.int32, generator=g)
    ref, out = logits.clone(), logits.clone()
    apply_token_bitmask_(ref, bm, backend="torch")
    apply_token_bitmask_(out, bm, backend="cpu")
    assert torch.equal(out, ref), dtype
    keys, q = torch.randn(500, 64, generator=g).to(dtype), torch.randn(5, 64, generator=g)
    d, i = knn_search(q, keys, 8, backend="cpu")
    true = ((q.double()[:, None] - keys.double()[None]) ** 2).sum(-1).topk(8, largest=False)
    assert torch.equal(i, true.indices) and torch.allclose(d.double(), true.values, rtol=1e-5, atol=1e-4), dtype
    dists, values = torch.rand(2, 16, generator=g), torch.randint(0, 1000, (2, 16), generator=g)
    got = knn_interpolate(logits[:2], dists, values, lmbda=0.3, temperature=1.0, backend="cpu")
    want = knn_interpolate(logits[:2], dists, values, lmbda=0.3, temperature=1.0, backend="torch")
    assert torch.allclose(got, want, atol=2e-5, rtol=2e-5), dtype
    mq, mk, mv = torch.randn(1, 4, 2, 64, generator=g), torch.randn(2, 300, 64, generator=g), torch.randn(2, 300, 64, generator=g)
    out, lse, idx = memory_attention(mq, mk.to(dtype), mv.to(dtype), topk=5, backend="cpu")
    r_out, r_lse, r_idx = memory_attention(mq, mk.to(dtype).float(), mv.to(dtype).float(), topk=5, backend="torch")
    assert torch.equal(idx.sort(-1).values, r_idx.sort(-1).values), dtype
    assert torch.allclose(out, r_out, atol=1e-4) and torch.allclose(lse, r_lse, atol=1e-4), dtype
print("ok", kcore._C.cpu_features()["isa"])
"""


@needs_qemu
@pytest.mark.slow
@pytest.mark.parametrize("model, isa", [("Nehalem", "baseline"), ("Haswell", "avx2")])
def test_emulated_cpu_kernels_match_reference(model, isa):
    """The kernels themselves on an emulated older CPU (about a minute each: torch under qemu)."""
    r = _under_qemu(model, _EMULATED_KERNELS, 900, KCORE_FORCE_ISA="")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", isa]
