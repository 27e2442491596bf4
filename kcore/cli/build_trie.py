"""``kcore build-trie``: stream a knowledge base into a ``.ktrie`` file for a tokenizer.

The KB file is read line by line (plain or compressed), tokenized in batches and built by the
native external-memory builder, in memory bounded by ``--memory-budget`` whatever its size
(see :meth:`kcore.FactTrie.from_kb_file`). Ctrl-C or SIGTERM stops the build and leaves no file.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

from kcore.errors import KcoreError


def parse_size(text: str) -> int:
    """``"1G"``, ``"512M"``, ``"64k"`` or a number of bytes -> bytes (powers of 1024).

    Raises:
        KcoreError: not a positive size.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise KcoreError(f"--memory-budget must be a positive size such as 512M or 2G, got {text!r}")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def register(sub) -> None:
    p = sub.add_parser("build-trie", help="build a .ktrie fact trie from a knowledge base for a tokenizer")
    p.add_argument("--facts", required=True,
                   help="knowledge base: .tsv / .jsonl triples or .txt verbalized facts, plain or .gz/.bz2/.xz/.zst; "
                        "or 'builtin' (GeoNames, 106k facts) / 'builtin-large' (GeoNames + countrystatecity + "
                        "airportsdata, 1.87M facts)")
    p.add_argument("--tokenizer", default=None,
                   help="local Hugging Face model/tokenizer folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output .ktrie file (written atomically)")
    p.add_argument("--template", default=None, help='verbalization of triples (default "{subject} {relation} {object} .")')
    p.add_argument("--no-leading-space", action="store_true",
                   help="tokenize facts without a leading space (default: with, as they follow 'Fact:')")
    p.add_argument("--memory-budget", default="1G",
                   help="memory of the native builder: sort buffer and suffix register (default 1G; peak RSS is "
                        "about this plus the tokenizer's few hundred MB)")
    p.add_argument("--bad-lines", choices=("error", "skip"), default="error",
                   help="a malformed line stops the build with file:line (error, default) or is skipped and counted (skip)")
    p.add_argument("--tmp-dir", default=None, help="folder of the scratch files (default: the output's folder)")
    p.add_argument("--no-word-cache", action="store_true",
                   help="tokenize every fact whole (default: a word cache for byte-level BPE tokenizers, same tokens)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--stats-json", default=None, help="also write the build statistics (counts, seconds) to this JSON file")
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python runs next (also inside the native build, which checks for
    signals), so the build unwinds and removes its files as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run(args) -> int:
    import kcore
    from kcore import kb

    out = Path(args.out)
    if not out.parent.exists():
        raise KcoreError(f"output folder {str(out.parent)!r} does not exist")
    template = args.template or kb.DEFAULT_TEMPLATE
    budget = parse_size(args.memory_budget)
    if args.facts not in kb.BUILTIN_KBS and not Path(args.facts).is_file():
        raise KcoreError(f"facts file {args.facts!r} not found")
    tokenizer = load_tokenizer(args.tokenizer)
    build = dict(
        leading_space=not args.no_leading_space,
        memory_budget_bytes=budget,
        tmp_dir=args.tmp_dir,
        progress=not args.quiet,
        word_cache=False if args.no_word_cache else None,
    )
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.perf_counter()
    try:
        if args.facts in kb.BUILTIN_KBS:
            trie = kcore.FactTrie.from_facts(kb.builtin_facts(args.facts, template=template), tokenizer, out, **build)
        else:
            import warnings

            with warnings.catch_warnings():  # the skipped lines are listed below
                warnings.simplefilter("ignore", UserWarning)
                trie = kcore.FactTrie.from_kb_file(args.facts, tokenizer, out, template=template,
                                                   bad_lines=args.bad_lines, **build)
    except KeyboardInterrupt as e:
        print(f"kcore build-trie: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; no file written",
              file=sys.stderr)
        return 130 if not isinstance(e, Terminated) else 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    seconds = time.perf_counter() - t0
    s = trie.build_stats
    print(f"wrote {out}: {trie.num_facts} facts ({s['num_input']} read), {trie.num_nodes} nodes, "
          f"{trie.nbytes / 1e6:.2f} MB ({trie.nbytes / trie.num_facts:.2f} bytes/fact), vocab {trie.vocab_size}, "
          f"{seconds:.1f} s ({s['num_input'] / max(seconds, 1e-9):,.0f} facts/s; reading+tokenizing "
          f"{s['produce_s']:.1f} s, adding {s['add_s']:.1f} s, merging+writing {s['finish_s']:.1f} s; "
          f"{s['num_runs']} runs, peak temporary disk {s['peak_temp_bytes'] / 1e6:.1f} MB)")
    if args.stats_json:
        import json

        Path(args.stats_json).write_text(json.dumps(dict(s, wall_s_cli=seconds, file=str(out)), indent=1))
    if s.get("bad_lines"):
        print(f"skipped {s['bad_lines']} malformed line(s) of {s['lines']}:", file=sys.stderr)
        for m in s["bad_line_examples"]:
            print(f"  {m}", file=sys.stderr)
        if s["bad_lines"] > len(s["bad_line_examples"]):
            print(f"  ... and {s['bad_lines'] - len(s['bad_line_examples'])} more", file=sys.stderr)
    return 0
