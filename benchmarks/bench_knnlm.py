"""kNN-LM and MLP Memory on real text: held-out perplexity, cost per token, generation tokens/s.

SmolLM2-135M-Instruct on the Lee background news corpus (300 articles, ~60k words, shipped in the
gensim wheel), split by document into train / dev / test (80 / 10 / 10 %, seeded). The datastore
is built from train (keys = input of the last layer's MLP after its norm, fp16). kNN-LM's lmbda
and temperature and MLP Memory's lmbda are tuned on dev (grid) and reported on test. MLP Memory is
trained on the datastore with kNN targets (own entry dropped). Cost per token compares exact
search over the datastore (kcore.ops.knn_search, backend cpu) with an MLP Memory forward, measured
in the same process. Generation: greedy, batch 1, plain model vs kNN-LM, kNN-LM with adaptive
retrieval and MLP Memory.

Expensive stages are cached in --work (datastore, dev/test key states, neighbour lists, MLP
Memory) so the script can be re-run; delete the folder to start over. The timing stages (cost
per token, generation) take the machine's benchmark lock (--lock, an flock file) themselves, so
the long untimed stages do not block other benchmarks:

    python benchmarks/bench_knnlm.py --work /tmp/knnlm_work --out /tmp/knnlm_work/results.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kcore.cli.perplexity import knn_target_logprob, mix_target_logprob, mlp_target_logprob  # noqa: E402
from kcore.corpus import load_documents, split_documents  # noqa: E402
from kcore.memory import Datastore, MLPMemory, train_mlp_memory  # noqa: E402
from kcore.memory.datastore import extract_key_states  # noqa: E402
from kcore.memory.mlp_memory import knn_targets  # noqa: E402
from kcore.models import load_model_and_tokenizer  # noqa: E402

LMBDAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)
TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)


def log(msg):
    print(msg, flush=True)


def states(model, tok, texts, max_length):
    parts = list(extract_key_states(model, tok, texts, batch_size=8, max_length=max_length, with_lm=True, progress=True))
    order = torch.argsort(torch.cat([p.rows for p in parts]))
    return {n: torch.cat([getattr(p, n) for p in parts])[order] for n in ("keys", "targets", "lm_logprobs", "lm_entropy")}


def neighbours(ds, keys, k, batch=256, **search):
    search = search or {"exact": True, "backend": "cpu"}
    dists, tokens = [], []
    for i in range(0, keys.shape[0], batch):
        d, ids = ds.search(keys[i : i + batch], k, **search)
        dists.append(d)
        tokens.append(ds.neighbour_tokens(ids).to(torch.int32))
    return {"dists": torch.cat(dists), "tokens": torch.cat(tokens)}


def ppl(logprobs):
    return math.exp(-float(logprobs.double().mean()))


def knn_logprob(st, nb, T, chunk=2048):
    out = []
    for i in range(0, st["targets"].shape[0], chunk):
        out.append(knn_target_logprob(nb["dists"][i : i + chunk], nb["tokens"][i : i + chunk].long(),
                                      st["targets"][i : i + chunk], T))
    return torch.cat(out)


class BenchLock:
    """Exclusive flock on a file for the timed stages (no-op without a path)."""

    def __init__(self, path, timeout_s=900.0):
        self.path, self.timeout_s, self.acquired = path, timeout_s, False

    def __enter__(self):
        if self.path:
            import fcntl

            self.f = open(self.path, "a")
            deadline = time.monotonic() + self.timeout_s
            while True:
                try:
                    fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self.acquired = True
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        log(f"benchmark lock {self.path} not acquired after {self.timeout_s:.0f} s: timing anyway")
                        break
                    time.sleep(2)
        return self

    def __exit__(self, *exc):
        if self.path:
            self.f.close()


def time_it(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/knnlm_work", help="cache folder")
    ap.add_argument("--k", type=int, default=1024, help="kNN-LM neighbours")
    ap.add_argument("--mlp-k", type=int, default=256, help="neighbours of the MLP Memory training targets")
    ap.add_argument("--mlp-epochs", type=int, default=6)
    ap.add_argument("--mlp-width", type=int, default=256)
    ap.add_argument("--mlp-depth", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--gen-prompts", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--index", action="store_true", help="also measure kNN-LM with a faiss IVF-PQ index")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in the timed stages (1: a shared machine makes OpenMP barriers stall)")
    ap.add_argument("--gen-rounds", type=int, default=3, help="interleaved rounds of the generation timing")
    ap.add_argument("--lock-timeout", type=float, default=900.0, help="seconds to wait for the lock")
    ap.add_argument("--lock", default="/tmp/kcore_bench.lock", help="flock file held while timing ('' for none)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}

    model, tok = load_model_and_tokenizer()
    split = split_documents(load_documents("lee_background"))
    res["split_docs"] = {k: len(v) for k, v in split.items()}

    # -- 1. datastore from train, key states of dev / test ------------------------------------
    if not (work / "train_ds" / "meta.json").exists():
        t = time.perf_counter()
        Datastore.build(model, tok, split["train"], work / "train_ds", batch_size=8, max_length=args.max_length)
        log(f"datastore built in {time.perf_counter() - t:.0f} s")
    ds = Datastore.load(work / "train_ds", tokenizer=tok, hidden_size=model.config.hidden_size)
    sts, tags = {}, {}
    for name in ("dev", "test"):
        # caches are keyed by the documents they come from
        tags[name] = hashlib.sha256("\n".join(split[name]).encode()).hexdigest()[:10]
        f = work / f"{name}_states_{tags[name]}.pt"
        if not f.exists():
            torch.save(states(model, tok, split[name], args.max_length), f)
        sts[name] = torch.load(f)
    res["tokens"] = {"train (datastore entries)": ds.count, "dev": len(sts["dev"]["targets"]),
                     "test": len(sts["test"]["targets"])}
    log(f"datastore {ds.count} entries; dev {res['tokens']['dev']} / test {res['tokens']['test']} tokens")

    # -- 2. kNN-LM: neighbours once, lmbda x temperature grid on dev ----------------------------
    nbs = {}
    for name in ("dev", "test"):
        f = work / f"{name}_nb_k{args.k}_{tags[name]}.pt"
        if not f.exists():
            t = time.perf_counter()
            torch.save(neighbours(ds, sts[name]["keys"], args.k), f)
            log(f"{name}: exact search of {len(sts[name]['targets'])} queries in {time.perf_counter() - t:.0f} s")
        nbs[name] = torch.load(f)
    base = {n: ppl(sts[n]["lm_logprobs"]) for n in ("dev", "test")}
    grid = {}
    for T in TEMPERATURES:
        pk = knn_logprob(sts["dev"], nbs["dev"], T)
        for lm in LMBDAS:
            grid[(T, lm)] = ppl(mix_target_logprob(sts["dev"]["lm_logprobs"], pk, lm))
    (T_best, lm_best), dev_knn = min(grid.items(), key=lambda kv: kv[1])
    test_knn = ppl(mix_target_logprob(sts["test"]["lm_logprobs"], knn_logprob(sts["test"], nbs["test"], T_best), lm_best))
    log(f"base ppl dev {base['dev']:.3f} test {base['test']:.3f}; kNN-LM (T={T_best}, lmbda={lm_best}) "
        f"dev {dev_knn:.3f} test {test_knn:.3f}")
    res["knn_grid_dev"] = {f"T={T},lmbda={lm}": round(v, 4) for (T, lm), v in grid.items()}

    # Adaptive retrieval: search only where the LM entropy is at least the dev median.
    thr = float(sts["dev"]["lm_entropy"].median())
    hi = sts["test"]["lm_entropy"] >= thr
    pk_test = knn_logprob(sts["test"], nbs["test"], T_best)
    mixed = mix_target_logprob(sts["test"]["lm_logprobs"], pk_test, lm_best)
    test_adaptive = ppl(torch.where(hi, mixed, sts["test"]["lm_logprobs"]))
    res["adaptive"] = {"entropy_threshold_nats": thr, "test_skipped_share": float((~hi).float().mean()),
                       "test_ppl": test_adaptive}

    # -- 3. MLP Memory --------------------------------------------------------------------------
    mem_path = work / f"mlp_memory_w{args.mlp_width}_d{args.mlp_depth}_k{args.mlp_k}_T{T_best}_e{args.mlp_epochs}.safetensors"
    if not mem_path.exists():
        tf = work / f"train_targets_k{args.mlp_k}_T{T_best}.pt"
        t = time.perf_counter()
        if not tf.exists():
            torch.save(knn_targets(ds, k=args.mlp_k, temperature=T_best, backend="cpu", progress=True), tf)
        target_s = time.perf_counter() - t
        t = time.perf_counter()
        mem, hist = train_mlp_memory(ds, k=args.mlp_k, temperature=T_best, epochs=args.mlp_epochs, lr=2e-3,
                                     batch_size=512, width=args.mlp_width, depth=args.mlp_depth, expansion=4,
                                     targets=torch.load(tf))
        train_s = time.perf_counter() - t
        mem.save(mem_path)
        (mem_path.with_suffix(".json")).write_text(json.dumps({"history": hist, "train_seconds": train_s,
                                                                 "target_search_seconds": target_s}))
    mem = MLPMemory.load(mem_path, tokenizer=tok, hidden_size=model.config.hidden_size)
    res["mlp_training"] = json.loads(mem_path.with_suffix(".json").read_text())
    pm = {n: mlp_target_logprob(mem, sts[n]["keys"], sts[n]["targets"]) for n in ("dev", "test")}
    mgrid = {lm: ppl(mix_target_logprob(sts["dev"]["lm_logprobs"], pm["dev"], lm)) for lm in LMBDAS}
    lm_mlp, dev_mlp = min(mgrid.items(), key=lambda kv: kv[1])
    test_mlp = ppl(mix_target_logprob(sts["test"]["lm_logprobs"], pm["test"], lm_mlp))
    res["mlp_grid_dev"] = {f"lmbda={k}": round(v, 4) for k, v in mgrid.items()}
    recovered = (base["test"] - test_mlp) / (base["test"] - test_knn) if base["test"] != test_knn else float("nan")
    res["perplexity"] = {
        "base": base, "knn": {"dev": dev_knn, "test": test_knn, "T": T_best, "lmbda": lm_best, "k": args.k},
        "mlp": {"dev": dev_mlp, "test": test_mlp, "lmbda": lm_mlp, "params": sum(p.numel() for p in mem.parameters()),
                "outputs": mem.config["num_outputs"]},
        "mlp_share_of_knn_gain_test": recovered,
    }
    log(f"MLP Memory (lmbda={lm_mlp}) dev {dev_mlp:.3f} test {test_mlp:.3f}; share of kNN-LM's gain {recovered:.2f}")

    # -- 4. cost per token: exact search vs MLP Memory forward -----------------------------------
    from kcore.ops import knn_search

    cost = {}
    q_all = sts["test"]["keys"]
    torch.set_num_threads(args.threads)
    lock = BenchLock(args.lock, args.lock_timeout).__enter__()
    res["timing"] = {"torch_threads": args.threads, "bench_lock_held": lock.acquired}
    for nq in (1, 64):
        q = q_all[:nq].contiguous()
        # correctness first: the cpu backend equals the torch reference on these queries
        d_cpu, _ = knn_search(q, ds.keys, args.k, backend="cpu")
        d_ref, _ = knn_search(q, ds.keys, args.k, backend="torch")
        torch.testing.assert_close(d_cpu, d_ref, atol=1e-2, rtol=1e-3)
        rep = 20 if nq == 1 else 5
        t_search = time_it(lambda: knn_search(q, ds.keys, args.k, backend="cpu"), rep)
        t_torch = time_it(lambda: knn_search(q, ds.keys, args.k, backend="torch"), max(2, rep // 4))
        with torch.no_grad():
            t_mlp = time_it(lambda: mem.log_probs(q), rep)
        cost[nq] = {"search_cpu_ms_per_token": 1e3 * t_search / nq, "search_torch_ms_per_token": 1e3 * t_torch / nq,
                    "mlp_ms_per_token": 1e3 * t_mlp / nq, "ratio_search_cpu_over_mlp": t_search / t_mlp}
    cost["flops_per_token"] = {"exact_search": 2 * ds.count * ds.dim, "mlp": mem.flops_per_token()}
    cost["bytes_per_token_batch1"] = {"exact_search_keys": ds.count * ds.dim * 2,
                                      "mlp_weights_fp32": 4 * sum(p.numel() for p in mem.parameters())}
    res["cost"] = cost
    log(f"cost per token: {json.dumps(cost)}")

    # -- 4b. approximate search: faiss IVF-PQ (kNN-LM's setting), with and without exact re-ranking
    if args.index:
        import shutil

        idx_dir = work / "train_ds_ivfpq"
        if not (idx_dir / "index.json").exists():
            shutil.rmtree(idx_dir, ignore_errors=True)
            shutil.copytree(work / "train_ds", idx_dir)
            lock.__exit__()
            t = time.perf_counter()
            Datastore.load(idx_dir).build_index(nlist=256, m=64, nbits=8)
            res["index_build_seconds"] = time.perf_counter() - t
            lock = BenchLock(args.lock, args.lock_timeout).__enter__()
        ids_ = Datastore.load(idx_dir)
        res["ivfpq"] = {"factory": ids_._index_meta["factory"], "nprobe": 32}
        for rerank in (False, True):
            nb = neighbours(ids_, sts["test"]["keys"], args.k, nprobe=32, rerank=rerank)
            p = ppl(mix_target_logprob(sts["test"]["lm_logprobs"], knn_logprob(sts["test"], nb, T_best), lm_best))
            row = {"test_ppl": p}
            for nq in (1, 64):
                q = q_all[:nq].contiguous()
                row[f"ms_per_token_nq{nq}"] = 1e3 * time_it(lambda: ids_.search(q, args.k, nprobe=32, rerank=rerank),
                                                            20 if nq == 1 else 5) / nq
            res["ivfpq"]["rerank" if rerank else "pq_distances"] = row
        log(f"IVF-PQ: {json.dumps(res['ivfpq'])}")

    # -- 5. generation tokens/s ------------------------------------------------------------------
    from kcore.hf import KNNLMLogitsProcessor, MLPMemoryLogitsProcessor

    prompts = [tok(t)["input_ids"][:32] for t in split["test"][: args.gen_prompts]]
    gen = {}

    def run(procs):
        new = 0
        t = time.perf_counter()
        for p in prompts:
            ids = torch.tensor([p])
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                     do_sample=False, pad_token_id=tok.pad_token_id, logits_processor=procs)
            new += out.shape[1] - ids.shape[1]
        return new / (time.perf_counter() - t)

    variants = {
        "plain": lambda: None,
        "knn_lm": lambda: KNNLMLogitsProcessor(model, ds, k=args.k, lmbda=lm_best, temperature=T_best),
        "knn_lm_adaptive": lambda: KNNLMLogitsProcessor(model, ds, k=args.k, lmbda=lm_best, temperature=T_best,
                                                        adaptive_entropy=thr),
        "mlp_memory": lambda: MLPMemoryLogitsProcessor(model, mem, lmbda=lm_mlp),
    }
    run([])  # warm-up
    rates = {name: [] for name in variants}
    # Interleaved rounds, median per variant: slow drifts of a shared machine hit all variants alike.
    for _ in range(args.gen_rounds):
        for name, make in variants.items():
            proc = make()
            rates[name].append(run([proc] if proc is not None else []))
            if proc is not None:
                if name == "knn_lm_adaptive":
                    gen["adaptive_skipped_share"] = proc.skipped_share
                proc.remove()
    for name, r in rates.items():
        gen[name] = statistics.median(r)
        gen[f"{name}_vs_plain"] = statistics.median(r) / statistics.median(rates["plain"])
    lock.__exit__()
    res["generation_tokens_per_s"] = gen
    log(f"generation tokens/s: {json.dumps(gen)}")

    text = json.dumps(res, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
