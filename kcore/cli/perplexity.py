"""``kcore perplexity``: perplexity of a local HF causal LM on a text file, alone, with kNN-LM
(``--knn DATASTORE``) and/or with MLP Memory (``--mlp-memory FILE``)."""

from __future__ import annotations

import math

import torch


def register(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a model on text, optionally with kNN-LM or MLP Memory")
    p.add_argument("--model", default=None, help="local HF model folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--docs", choices=("file", "line", "blank"), default="file",
                   help="documents: the whole file, one per line, or separated by blank lines (default: file)")
    p.add_argument("--knn", default=None, help="datastore folder (kcore build-datastore)")
    p.add_argument("--mlp-memory", default=None, help="MLP Memory file (.safetensors)")
    p.add_argument("--lmbda", type=float, default=0.25, help="weight of the memory distribution")
    p.add_argument("--temperature", type=float, default=1.0, help="kNN softmax temperature (squared L2 units)")
    p.add_argument("--k", type=int, default=1024, help="neighbours")
    p.add_argument("--exact", action="store_true", help="exact search even if the datastore has an index")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--stride", type=int, default=None)
    p.set_defaults(func=run)


def knn_target_logprob(dists: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p_kNN(target) per row: ``dists``/``tokens`` ``(n, k)`` from a search (l2, -1 padding),
    ``targets`` ``(n,)``; returns ``(n,)`` float32 (``-inf`` where no neighbour has the target)."""
    # Shift by each row's nearest distance (softmax is shift-invariant): with a tiny temperature
    # -dist / temperature would overflow to -inf for every neighbour and give NaN.
    nearest = dists.min(dim=-1, keepdim=True).values
    nearest = torch.where(torch.isfinite(nearest), nearest, torch.zeros_like(nearest))
    logits = (-(dists - nearest) / temperature).masked_fill(tokens < 0, -math.inf)
    logw = torch.log_softmax(logits, dim=-1)
    hit = tokens == targets[:, None]
    return torch.logsumexp(logw.masked_fill(~hit, -math.inf), dim=-1)


def mix_target_logprob(lm: torch.Tensor, mem: torch.Tensor, lmbda: float) -> torch.Tensor:
    """``log((1 - lmbda) exp(lm) + lmbda exp(mem))`` elementwise, exact at lmbda 0 and 1."""
    if lmbda == 0.0:
        return lm
    if lmbda == 1.0:
        return mem
    return torch.logaddexp(lm + math.log1p(-lmbda), mem + math.log(lmbda))


def mlp_target_logprob(mlp_memory, keys: torch.Tensor, targets: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """log p_MLP(target) per row (``-inf`` for targets outside the MLP's outputs): ``(n,)`` float32."""
    vs = mlp_memory.config["vocab_size"]
    local = torch.full((vs,), -1, dtype=torch.long)
    local[mlp_memory.token_ids] = torch.arange(mlp_memory.token_ids.numel())
    out = []
    with torch.no_grad():
        for i in range(0, keys.shape[0], chunk):
            logq = torch.log_softmax(mlp_memory(keys[i : i + chunk].float()), dim=-1)
            idx = local[targets[i : i + chunk]]
            lp = logq.gather(1, idx.clamp_min(0)[:, None])[:, 0]
            out.append(lp.masked_fill(idx < 0, -math.inf))
    return torch.cat(out) if out else torch.empty(0)


def run(args) -> int:
    from kcore.cli.build_datastore import read_documents
    from kcore.errors import KcoreError
    from kcore.memory import Datastore, MLPMemory
    from kcore.memory.datastore import extract_key_states
    from kcore.models import load_model_and_tokenizer

    if not 0.0 <= args.lmbda <= 1.0:
        raise KcoreError(f"--lmbda must be in [0, 1], got {args.lmbda}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise KcoreError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.k < 1:
        raise KcoreError(f"--k must be >= 1, got {args.k}")
    docs = read_documents(args.text, args.docs)  # before the model: a bad path fails fast
    model, tok = load_model_and_tokenizer(args.model)
    hidden = model.config.hidden_size
    vocab = model.get_output_embeddings().weight.shape[0]
    ds = Datastore.load(args.knn, tokenizer=tok, hidden_size=hidden, vocab_size=vocab) if args.knn else None
    mem = MLPMemory.load(args.mlp_memory, hidden_size=hidden, vocab_size=vocab, tokenizer=tok) if args.mlp_memory else None
    key = ds.key if ds is not None else (mem.config["key"] if mem is not None else "mlp_input")
    if ds is not None and mem is not None and mem.config["key"] != ds.key:
        raise KcoreError(f"the datastore uses key {ds.key!r}, the MLP Memory {mem.config['key']!r}")
    sums = {"base": 0.0, "knn": 0.0, "mlp": 0.0}
    n = 0
    for b in extract_key_states(model, tok, docs, key=key, batch_size=args.batch_size, max_length=args.max_length,
                                stride=args.stride, with_lm=True, progress=True):
        n += len(b.targets)
        sums["base"] += float(b.lm_logprobs.sum())
        if ds is not None:
            d, ids = ds.search(b.keys, args.k, exact=True if args.exact else None)
            p = knn_target_logprob(d, ds.neighbour_tokens(ids), b.targets, args.temperature)
            sums["knn"] += float(mix_target_logprob(b.lm_logprobs, p, args.lmbda).sum())
        if mem is not None:
            p = mlp_target_logprob(mem, b.keys, b.targets)
            sums["mlp"] += float(mix_target_logprob(b.lm_logprobs, p, args.lmbda).sum())
    if n == 0:
        raise KcoreError("the text yields no token to predict")
    print(f"tokens: {n}")
    print(f"perplexity (model): {math.exp(-sums['base'] / n):.3f}")
    if ds is not None:
        print(f"perplexity (kNN-LM, k={args.k}, lmbda={args.lmbda}, T={args.temperature}): {math.exp(-sums['knn'] / n):.3f}")
    if mem is not None:
        print(f"perplexity (MLP Memory, lmbda={args.lmbda}): {math.exp(-sums['mlp'] / n):.3f}")
    return 0
