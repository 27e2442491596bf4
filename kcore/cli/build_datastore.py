"""``kcore build-datastore``: build a kNN-LM datastore from a text file with a local HF causal LM."""

from __future__ import annotations

from pathlib import Path

from kcore.errors import KcoreError


def register(sub) -> None:
    p = sub.add_parser("build-datastore", help="build a kNN-LM datastore (keys = last layer's MLP input) from text")
    p.add_argument("--model", default=None, help="local HF model folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--docs", choices=("file", "line", "blank"), default="file",
                   help="documents: the whole file, one per line, or separated by blank lines (default: file)")
    p.add_argument("--out", required=True, help="output datastore folder")
    p.add_argument("--key", choices=("mlp_input", "final_norm"), default="mlp_input")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="key dtype")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="tokens per window")
    p.add_argument("--stride", type=int, default=None, help="window advance (default max-length / 2)")
    p.add_argument("--index", action="store_true", help="also build a faiss IVF-PQ index (needs kcore[faiss])")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def read_documents(path: str, mode: str):
    """Documents of a text file: ``file`` (one), ``line`` (non-empty lines), ``blank`` (paragraphs)."""
    f = Path(path)
    if not f.is_file():
        raise KcoreError(f"--text {path!r}: no such file")
    text = f.read_text(encoding="utf-8", errors="replace")
    if mode == "line":
        docs = text.splitlines()
    elif mode == "blank":
        docs = [" ".join(p.split()) for p in text.split("\n\n")]
    else:
        docs = [text]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise KcoreError(f"--text {path!r} holds no text")
    return docs


def run(args) -> int:
    import torch

    from kcore.memory import Datastore
    from kcore.models import load_model_and_tokenizer

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise KcoreError(f"--out {args.out!r} already exists; pass --overwrite to replace it")
    docs = read_documents(args.text, args.docs)
    model, tok = load_model_and_tokenizer(args.model)
    ds = Datastore.build(model, tok, docs, args.out, batch_size=args.batch_size, max_length=args.max_length,
                         stride=args.stride, key=args.key, dtype=getattr(torch, args.dtype), overwrite=args.overwrite)
    if args.index:
        ds.build_index()
    print(f"datastore {ds.path}: {ds.count} entries, dim {ds.dim}, {ds.meta['key_dtype']} keys, layer {ds.layer}"
          + (", faiss index built" if args.index else ""))
    return 0
