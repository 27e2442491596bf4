"""kcore's .ktrie beside ReFactX's real index: PyPI ``refactx`` 0.1.2 writing into PostgreSQL 15.

Same facts (a KB file, verbalized ``"<subject> <relation> <object> ."`` and given one leading
space, as both systems store them), same tokenizer (SmolLM2-135M-Instruct's), one process:

* **ReFactX**: a throw-away PostgreSQL cluster is created on a local port (``pg_createcluster``
  and ``pg_ctlcluster`` as root, which run the server as the ``postgres`` user; ``initdb`` +
  ``pg_ctl`` as anyone else), then ReFactX's own ingestion ``refactx.populate_postgres_index``
  (its default ``switch_parameter`` 7: one row per prefix up to depth 7, the rest of each
  subtree pickled into the row; batched ``COPY``, then its btree index and primary key) and its
  own lookup ``PostgresTrieIndex.next_tokens`` (with its default LRU cache of 1,024 prefixes and
  the per-sequence subtree cache of its ``PatternConstrainedState``). The cluster is stopped and
  removed at the end, whatever happens.
* **kcore**: :meth:`kcore.FactTrie.from_facts` on the same strings (tokenization included, as in
  ReFactX's ingestion), then per step ``step`` + ``next_tokens_from`` (the same answer: the next
  tokens after one more token) and ``step`` + ``fill_bitmask`` (what decoding uses).

Measured: ingestion wall time, disk bytes (``pg_total_relation_size``: heap, TOAST and indexes;
the ``.ktrie`` file size), per-step lookup latency while writing sampled facts token by token.
Correctness first: the two indexes must give the same next tokens at every step.

Run (root, or a user who may run initdb): ``python benchmarks/bench_refactx_index.py --kb FILE
[--limit N] [--results FILE]``; the KB may be ``builtin`` / ``builtin-large``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

PG_VERSION = "15"
PG_BIN = Path(f"/usr/lib/postgresql/{PG_VERSION}/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres(folder: Path):
    """A PostgreSQL 15 server on a free local port with a fresh data folder; yields its URL."""
    port = free_port()
    data = folder / "pgdata"
    name = f"kcorebench{os.getpid()}"
    as_root = os.geteuid() == 0
    if as_root:
        if shutil.which("pg_createcluster") is None:
            raise SystemExit("needs Debian's postgresql package: apt-get install postgresql")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "postgres", "postgres")
        subprocess.run(["pg_createcluster", PG_VERSION, name, "-p", str(port), "-d", str(data), "--",
                        "--auth=trust", "--no-sync"], check=True, capture_output=True)
        start = ["pg_ctlcluster", PG_VERSION, name, "start"]
        cleanup = [["pg_dropcluster", "--stop", PG_VERSION, name]]
    else:
        subprocess.run([str(PG_BIN / "initdb"), "-D", str(data), "--auth=trust", "--no-sync", "-U", "postgres"],
                       check=True, capture_output=True)
        start = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", f"-p {port} -k {folder} -h 127.0.0.1", "-w", "start",
                 "-l", str(folder / "pg.log")]
        cleanup = [[str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]]
    try:
        subprocess.run(start, check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        for cmd in cleanup:
            subprocess.run(cmd, capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def load_facts(kb: str, limit: int) -> list:
    from kcore import kb as kbmod
    from kcore.kb_files import iter_facts

    it = kbmod.builtin_facts(kb) if kb in kbmod.BUILTIN_KBS else iter_facts(kb, bad_lines="skip")
    return list(dict.fromkeys(itertools.islice(it, limit) if limit else it))


def run(args) -> dict:
    import psycopg
    import refactx
    from refactx.generate import PatternConstrainedState
    from refactx.index import DictIndex, PostgresTrieIndex
    from refactx.SimpleCache import SimpleCache

    from bench_kb_scale import load_tokenizer
    from kcore.fact_tokenizer import FactTokenizer
    from kcore.trie import FactTrie

    tok = load_tokenizer()
    facts = load_facts(args.kb, args.limit)
    out = {"kind": "refactx", "kb": args.kb, "facts": len(facts), "refactx": "0.1.2", "loadavg_start": os.getloadavg()}
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    # kcore: strings -> .ktrie (tokenization included)
    path = work / "kcore.ktrie"
    t0 = time.perf_counter()
    trie = FactTrie.from_facts(facts, tok, path, progress=False)
    out["kcore_ingest_s"] = time.perf_counter() - t0
    out["kcore_bytes"] = trie.nbytes
    assert trie.num_facts == len(facts), (trie.num_facts, len(facts))

    sample = np.random.default_rng(0).choice(len(facts), size=min(args.sample, len(facts)), replace=False)
    sampled = [facts[i] for i in sample]
    tokens, offsets = FactTokenizer(tok).encode(sampled)
    seqs = [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(sampled))]

    # populate_postgres_index writes the rows of a batch when the 0-based line number reaches a
    # multiple of batch_size, and writes nothing after its loop: the lines after the last multiple
    # are dropped. So the batches are sized to end just past the last fact, and the stream is
    # padded up to that line with copies of the last fact (a duplicate adds nothing to its trie).
    tok_batch = 1000
    n_batches = -(-len(facts) // args.batch_size)
    batch = tok_batch * -(-len(facts) // (tok_batch * n_batches))
    pad = n_batches * batch + 1 - len(facts)
    out.update(refactx_batch_size=batch, refactx_padding_lines=pad)
    with throwaway_postgres(work / "pg") as url:
        lines = ((f + "\n").encode() for f in itertools.chain(facts, [facts[-1]] * pad))
        t0 = time.perf_counter()
        refactx.populate_postgres_index(file_reader=lines, postgres_url=url, tokenizer=tok, table_name="facts",
                                        batch_size=batch, tokenizer_batch_size=tok_batch, prefix=" ",
                                        total_number_of_triples=len(facts) + pad, count_leaves=False)
        out["refactx_ingest_s"] = time.perf_counter() - t0
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT pg_total_relation_size('facts'), pg_relation_size('facts'), "
                               "pg_indexes_size('facts'), (SELECT count(*) FROM facts)").fetchone()
            out.update(refactx_bytes=row[0], refactx_heap_bytes=row[1], refactx_index_bytes=row[2], refactx_rows=row[3])
        conn = psycopg.connect(url)
        index = PostgresTrieIndex(postgresql_connection=conn, table_name="facts", cache=SimpleCache())

        # Correctness, then time: ReFactX's next tokens after each prefix of each sampled fact.
        ref_times, steps = [], 0
        for seq in seqs:
            state = PatternConstrainedState(pattern="Fact:", tokenizer=tok, cache_index=DictIndex(), subtree_cache=DictIndex())
            for k in range(len(seq)):
                t0 = time.perf_counter_ns()
                nxt, _ = index.next_tokens(seq[:k], state=state)
                ref_times.append(time.perf_counter_ns() - t0)
                expect = trie.next_tokens(seq[:k]).tolist()
                assert sorted(nxt) == expect, (seq, k, sorted(nxt)[:10], expect[:10])
                steps += 1
        conn.close()
    out["refactx_step_us"] = float(np.mean(ref_times)) / 1e3
    out["refactx_step_p50_us"] = float(np.median(ref_times)) / 1e3

    words = (trie.vocab_size + 31) // 32
    mask = np.zeros((1, words), dtype=np.int32)
    k_next, k_fill = [], []
    for _ in range(3):
        for seq in seqs:
            s = np.array([trie.root_state], dtype=np.int64)
            for t in seq:
                t0 = time.perf_counter_ns()
                s2 = trie.step(s, np.array([t], dtype=np.int64))
                trie.next_tokens_from(int(s2[0]))
                k_next.append(time.perf_counter_ns() - t0)
                t0 = time.perf_counter_ns()
                s2 = trie.step(s, np.array([t], dtype=np.int64))
                trie.fill_bitmask(s2, mask)
                k_fill.append(time.perf_counter_ns() - t0)
                s = s2
    out.update(kcore_step_next_us=float(np.mean(k_next)) / 1e3, kcore_step_fill_us=float(np.mean(k_fill)) / 1e3,
               steps_checked=steps, sampled_facts=len(seqs))
    out["disk_ratio"] = out["refactx_bytes"] / out["kcore_bytes"]
    out["ingest_ratio"] = out["refactx_ingest_s"] / out["kcore_ingest_s"]
    out["step_ratio_next"] = out["refactx_step_us"] / out["kcore_step_next_us"]
    out["loadavg_end"] = os.getloadavg()
    path.unlink()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kb", required=True, help="KB file (.tsv/.jsonl/.txt, compressed or not) or builtin / builtin-large")
    p.add_argument("--limit", type=int, default=0, help="use the first N distinct facts (0: all)")
    p.add_argument("--sample", type=int, default=300, help="facts written token by token for the lookup latency")
    p.add_argument("--batch-size", type=int, default=1_000_000,
                   help="most facts per ReFactX ingestion batch (its in-memory tree between two COPY flushes)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary folder, removed after)")
    p.add_argument("--results", default="refactx_results.jsonl")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        args.workdir = tmp
        os.chmod(tmp, 0o755)  # the postgres user must reach its data folder
        out = run(args)
    out.update(date=time.strftime("%Y-%m-%d %H:%M:%S"), host=platform.node(), cpus=os.cpu_count())
    with open(args.results, "a") as f:
        f.write(json.dumps(out) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
