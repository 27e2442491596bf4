"""``kcore memory-generate``: generate with attention over a memory of documents, print citations.

The memory bank is built from text files with the model itself (Extended Mind Transformers), or
loaded from a file saved earlier; each generated token is listed with the memory spans it drew on
most.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kcore.errors import KcoreError


def register(sub) -> None:
    p = sub.add_parser(
        "memory-generate",
        help="generate with attention over a memory of documents (Extended Mind), print citations",
        description="Build (or load) a memory bank of documents and generate with memory attention.",
    )
    # Optional here so that `--memory A B "prompt"` works: --memory takes several files and would
    # swallow the prompt; run() then takes the last --memory item that is not a file as the prompt.
    p.add_argument("prompt", nargs="?", help="the user prompt")
    p.add_argument("--memory", nargs="+", metavar="FILE", default=[], help="text files to put in memory")
    p.add_argument("--bank", metavar="FILE", help="a saved bank: loaded if --memory is not given, else written")
    p.add_argument("--model", help="local HF model folder or .gguf (default SmolLM2-135M-Instruct)")
    p.add_argument("--topk", type=int, default=10, help="memories per query token and head (default 10)")
    p.add_argument("--layers", help="comma-separated layer indices using the memory (default all)")
    p.add_argument("--window", type=int, default=512, help="tokens per window when building (default 512)")
    p.add_argument("--stride", type=int, default=256, help="tokens between windows when building (default 256)")
    p.add_argument("--int8", action="store_true", help="store the bank's keys and values as int8")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--citations", type=int, default=1, metavar="N", help="memory spans shown per token (0: none)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from kcore.attention import MemoryBank
    from kcore.hf import enable_memory_attention
    from kcore.models import load_model_and_tokenizer

    if args.prompt is None and args.memory and not Path(args.memory[-1]).is_file():
        args.prompt, args.memory = args.memory[-1], args.memory[:-1]
    if args.prompt is None:
        raise KcoreError("give the prompt: kcore memory-generate --memory FILE... \"prompt\"")
    if not args.memory and not args.bank:
        raise KcoreError("give --memory FILE... to build a memory, or --bank FILE to load one")
    model, tok = load_model_and_tokenizer(args.model)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    names = []
    if args.memory:
        docs = []
        for f in args.memory:
            path = Path(f)
            if not path.is_file():
                raise KcoreError(f"--memory: no such file {f}")
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
            names.append(path.name)
        bank = MemoryBank.build(
            model, tok, docs, window=args.window, stride=args.stride, layers=layers,
            quantization="int8" if args.int8 else None,
        )
        if args.bank:
            bank.save(args.bank)
            print(f"saved {bank} to {args.bank}", file=sys.stderr)
    else:
        bank = MemoryBank.load(args.bank, tokenizer=tok, model=model)
    names = names or [f"document {i}" for i in range(len(bank.documents))]

    if args.no_chat or not getattr(tok, "chat_template", None):
        inputs = tok(args.prompt, return_tensors="pt")
    else:
        msgs = [{"role": "user", "content": args.prompt}]
        inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad(), enable_memory_attention(model, bank, topk=args.topk, layers=layers) as handle:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        cites = handle.citations(top=max(1, args.citations), context_tokens=3, skip_leading=1)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    print(tok.decode(new, skip_special_tokens=True))
    if args.citations > 0 and cites:
        print("\ncitations (token <- memory span, attention weight):")
        for token, step in zip(new, cites[0]):
            for rank, c in enumerate(step[: args.citations]):
                label = repr(tok.decode([token])) if rank == 0 else ""
                span = " ".join(c.text.split())
                print(f"  {label:>14} <- {names[c.document]}[{c.start}:{c.end}] {span!r} ({c.weight:.3f})")
    return 0
