"""kcore's parallel_for (csrc/core/parallel.cpp: the host's OpenMP team when torch has loaded one,
else kcore's persistent thread pool), exercised through the ops that use it.

Every op is compared with an independent result (the torch backend, or the same op row by row,
which runs single-threaded), while 8 Python threads call the ops at once; forked children and a
process exiting right after a parallel call must neither hang nor crash.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import kcore
from kcore._native import host_openmp_scope, native
from kcore.ops import apply_token_bitmask_, knn_search
from kcore.ops.memory_attention import memory_attention
from kcore.trie import FactTrie

# The ops below are large enough to be split over threads (knn: >= 8192 keys per chunk; trie:
# >= 1024 rows; bitmask: >= 2 MiB of logits per chunk; memory attention: >= 8 MiB of keys).
KNN_KEYS, DIM = 100_000, 64
TRIE_BATCH = 4096


def _trie(folder: Path) -> FactTrie:
    rng = np.random.default_rng(0)
    facts = [rng.integers(0, 1000, size=int(rng.integers(1, 5))).tolist() for _ in range(3000)]
    return FactTrie.build(facts, folder / "p.ktrie", vocab_size=1000, progress=False)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(KNN_KEYS, DIM, generator=g)
    queries = torch.randn(4, DIM, generator=g)
    # 2 KV heads x 20k memories x 64 x 4 bytes = 10 MiB of keys: above the split threshold.
    q = torch.randn(1, 6, 1, DIM, generator=g)
    mk = torch.randn(2, 20_000, DIM, generator=g)
    mv = torch.randn(2, 20_000, DIM, generator=g)
    trie = _trie(tmp_path_factory.mktemp("trie"))
    rng = np.random.default_rng(1)
    prefixes = [trie.root_state] + [trie.state_of(p) for p in ([int(t)] for t in trie.next_tokens([])[:50])]
    states = np.array([prefixes[i] for i in rng.integers(0, len(prefixes), TRIE_BATCH)], dtype=np.int64)
    tokens = rng.integers(0, 1000, TRIE_BATCH).astype(np.int64)
    logits = torch.randn(256, 49152, generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (256, 49152 // 32), generator=g, dtype=torch.int32)
    return dict(keys=keys, queries=queries, q=q, mk=mk, mv=mv, trie=trie, states=states, tokens=tokens,
                logits=logits, bitmask=bitmask)


def _expected(c):
    """Reference results computed without the pool: torch backends, and the trie row by row."""
    knn = knn_search(c["queries"], c["keys"], 10, backend="torch")
    attn = memory_attention(c["q"], c["mk"], c["mv"], topk=32, backend="torch")
    trie = c["trie"]
    step = np.array([trie.step([s], [t])[0] for s, t in zip(c["states"], c["tokens"])])
    words = (1000 + 31) // 32
    mask = np.zeros((TRIE_BATCH, words), dtype=np.int32)
    for i, s in enumerate(c["states"]):
        trie.fill_bitmask([s], mask[i : i + 1])
    masked = c["logits"].clone()
    apply_token_bitmask_(masked, c["bitmask"], backend="torch")
    return knn, attn, step, mask, masked


def _check_once(c, expected):
    knn, attn, step, mask, masked = expected
    d, i = knn_search(c["queries"], c["keys"], 10, backend="cpu")
    torch.testing.assert_close(d, knn[0], rtol=1e-4, atol=1e-3)
    assert torch.equal(i, knn[1])
    out, lse, idx = memory_attention(c["q"], c["mk"], c["mv"], topk=32, backend="cpu")
    torch.testing.assert_close(out, attn[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, attn[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(idx.sort(-1).values, attn[2].sort(-1).values)
    trie = c["trie"]
    assert np.array_equal(trie.step(c["states"], c["tokens"]), step)
    got = np.zeros_like(mask)
    trie.fill_bitmask(c["states"], got)
    assert np.array_equal(got, mask)
    logits = c["logits"].clone()
    apply_token_bitmask_(logits, c["bitmask"], backend="cpu")
    assert torch.equal(logits, masked)


def _scope(host_openmp: bool):
    return host_openmp_scope() if host_openmp else contextlib.nullcontext()


# In-process: kcore's pool (default outside kcore's hooks) and the host OpenMP team (in a scope).
SCOPES = pytest.mark.parametrize("in_scope", [False, True], ids=["kcore-pool", "host-openmp-scope"])


@SCOPES
def test_ops_match_references_from_eight_threads(cases, in_scope):
    expected = _expected(cases)
    with _scope(in_scope):
        _check_once(cases, expected)  # single caller first: the pool gets every chunk
    errors: list = []
    barrier = threading.Barrier(8)

    def work():
        try:
            barrier.wait()
            for _ in range(3):
                with _scope(in_scope):
                    _check_once(cases, expected)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a parallel call hung"
    assert not errors, errors


@SCOPES
def test_chunk_exception_reaches_caller_and_pool_survives(cases, in_scope):
    trie, states, tokens = cases["trie"], cases["states"].copy(), cases["tokens"]
    states[-1] = -7  # not a state: thrown inside the last chunk
    for _ in range(3):
        with _scope(in_scope), pytest.raises(kcore.InvalidInputError, match="not a state"):
            trie.step(states, tokens)
    expected = np.array([trie.step([s], [t])[0] for s, t in zip(cases["states"][:64], tokens[:64])])
    assert np.array_equal(trie.step(cases["states"], tokens)[:64], expected)


# Run in a fresh interpreter with 4 threads, so the pool has several workers even on a 2-core box.
_CHILD_PRELUDE = """
import os, sys, time, torch
from kcore.ops import knn_search
keys = torch.randn(100_000, 64)
queries = torch.randn(4, 64)
ref = knn_search(queries, keys, 10, backend="torch")
def check():
    d, i = knn_search(queries, keys, 10, backend="cpu")
    assert torch.equal(i, ref[1]), "wrong neighbours"
check()  # the pool exists from here on
"""


def _run_child(body: str, timeout: float, host_openmp: str = "1") -> subprocess.CompletedProcess:
    env = dict(os.environ, KCORE_NUM_THREADS="4", KCORE_HOST_OPENMP=host_openmp)
    code = textwrap.dedent(_CHILD_PRELUDE) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def _openmp_loaded() -> bool:
    with open("/proc/self/maps") as f:
        names = {line.split()[-1].rsplit("/", 1)[-1] for line in f if "/" in line}
    return any(n.startswith(("libgomp", "libiomp5", "libomp.")) for n in names)


def test_parallel_backend_modes():
    # Default: kcore's pool, except inside a host-OpenMP scope (kcore's HF hooks open one), where
    # the kernels run on torch's OpenMP team if one is loaded (its workers would otherwise spin
    # on the cores the pool needs). KCORE_HOST_OPENMP=0: never; =1: everywhere.
    team = "host-openmp" if _openmp_loaded() else "kcore-pool"
    assert native().parallel_backend() == "kcore-pool"
    with host_openmp_scope():
        assert native().parallel_backend() == team
        with host_openmp_scope():  # scopes nest
            pass
        assert native().parallel_backend() == team
    assert native().parallel_backend() == "kcore-pool"
    code = "from kcore._native import native, host_openmp_scope\nwith host_openmp_scope(): print(native().parallel_backend())\nprint(native().parallel_backend())\n"
    for value, want in (("0", "kcore-pool"), ("off", "kcore-pool"), ("1", team), ("true", team)):
        r = _run_child(code, 60, host_openmp=value)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [want, want], value
    r = _run_child(code, 60, host_openmp="auto")  # anything else: the default
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [team, "kcore-pool"]


def test_fork_child_of_a_torch_openmp_user_does_not_hang():
    # torch's OpenMP team runs in the parent before kcore's native module is loaded at all; the
    # child loads it after fork(). libgomp's team does not survive fork (GOMP_parallel would wait
    # for workers that do not exist; torch's own matmul hangs in such a child too, so the
    # reference is computed before the fork), so the child must use kcore's own pool.
    code = textwrap.dedent("""
    import os, torch
    keys, q = torch.randn(100_000, 64), torch.randn(4, 64)
    ref = (q @ keys.T).topk(10).indices
    pid = os.fork()
    if pid == 0:
        from kcore._native import native
        from kcore.ops import knn_search
        ok = torch.equal(knn_search(q, keys, 10, backend="cpu", metric="ip")[1], ref)
        print("child", native().parallel_backend(), ok, flush=True)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    from kcore._native import native
    print("parent", native().parallel_backend(), status)
    """)
    env = dict(os.environ, KCORE_NUM_THREADS="4", KCORE_HOST_OPENMP="1")  # the team everywhere
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert "child kcore-pool True" in lines
    # (The parent's backend is not asserted: its own parent, this pytest process, maps the same
    # libgomp, at the same address when ASLR is off, and the fork check then errs on the safe side.)
    assert any(line.startswith("parent ") and line.endswith(" 0") for line in lines)


# Both thread backends: the host's OpenMP team (torch's libgomp) and kcore's own pool.
BACKENDS = pytest.mark.parametrize("host_openmp", ["1", "0"])


@BACKENDS
def test_forked_child_after_pool_use_does_not_hang(host_openmp):
    body = """
    import multiprocessing as mp
    def child(q):
        check()
        q.put("ok")
    ctx = mp.get_context("fork")
    for _ in range(2):
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        p.join(60)
        assert p.exitcode == 0, f"child exit code {p.exitcode}"
        assert q.get(timeout=5) == "ok"
    check()  # the parent's pool still works after forking
    print("parent ok")
    """
    r = _run_child(body, timeout=120, host_openmp=host_openmp)
    assert r.returncode == 0, r.stderr
    assert "parent ok" in r.stdout


@BACKENDS
def test_exit_right_after_pool_use_is_clean(host_openmp):
    r = _run_child("print('done')\n", timeout=60, host_openmp=host_openmp)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "done"


@BACKENDS
def test_many_workers_many_callers_in_subprocess(host_openmp):
    # More workers than cores (KCORE_NUM_THREADS=4) and 4 callers hammering small and large calls:
    # the chunks a late worker misses are run by the caller, and no call loses a chunk.
    body = """
    import threading
    keys_small = keys[:20_000]
    ref_small = knn_search(queries, keys_small, 10, backend="torch")
    errors = []
    def work():
        try:
            for _ in range(20):
                check()
                assert torch.equal(knn_search(queries, keys_small, 10, backend="cpu")[1], ref_small[1])
        except BaseException as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors, errors
    print("ok")
    """
    r = _run_child(body, timeout=120, host_openmp=host_openmp)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
