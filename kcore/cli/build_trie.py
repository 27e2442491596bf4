"""``kcore build-trie``: tokenize a knowledge base and write its ``.ktrie`` file."""

from __future__ import annotations

import time
from pathlib import Path

from kcore.errors import KcoreError


def register(sub) -> None:
    p = sub.add_parser("build-trie", help="build a .ktrie fact trie from a knowledge base for a tokenizer")
    p.add_argument("--facts", required=True,
                   help="knowledge base: .tsv / .jsonl triples, .txt verbalized facts, or 'builtin' (GeoNames KB)")
    p.add_argument("--tokenizer", default=None,
                   help="local Hugging Face model/tokenizer folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output .ktrie file (written atomically)")
    p.add_argument("--template", default=None, help='verbalization of triples (default "{subject} {relation} {object} .")')
    p.add_argument("--no-leading-space", action="store_true",
                   help="tokenize facts without a leading space (default: with, as they follow 'Fact:')")
    p.set_defaults(func=run)


def load_tokenizer(path=None):
    """A Hugging Face tokenizer from a folder or a ``.gguf`` file; ``None`` = the default model's.

    Raises:
        KcoreError: the path does not exist, or transformers is not installed.
    """
    if path is None:
        from kcore.models import load_model_and_tokenizer

        return load_model_and_tokenizer(None)[1]
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise KcoreError("building a trie from text needs transformers; install it with `pip install 'kcore[hf]'`") from None
    p = Path(path)
    if not p.exists():
        raise KcoreError(f"tokenizer {path!r} not found: pass a local Hugging Face folder or a .gguf file")
    if p.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return AutoTokenizer.from_pretrained(str(p))


def run(args) -> int:
    import kcore
    from kcore import kb

    out = Path(args.out)
    if not out.parent.exists():
        raise KcoreError(f"output folder {str(out.parent)!r} does not exist")
    template = args.template or kb.DEFAULT_TEMPLATE
    t0 = time.perf_counter()
    if args.facts == "builtin":
        facts = kb.default_facts(template=template)
    else:
        if not Path(args.facts).is_file():
            raise KcoreError(f"facts file {args.facts!r} not found")
        facts = kb.load_facts(args.facts, template=template)
    tokenizer = load_tokenizer(args.tokenizer)
    trie = kcore.FactTrie.from_facts(facts, tokenizer, out, leading_space=not args.no_leading_space)
    seconds = time.perf_counter() - t0
    print(f"wrote {out}: {trie.num_facts} facts, {trie.num_nodes} nodes, {trie.nbytes / 1e6:.2f} MB, "
          f"vocab {trie.vocab_size}, {seconds:.1f} s")
    return 0
