"""The text -> trie pipeline: fact strings in, a ``.ktrie`` file out, in bounded memory.

Three stages run at once: the caller's iterator reads facts (for a KB file: decompression and
parsing, :mod:`kcore.kb_files`), :class:`kcore.fact_tokenizer.FactTokenizer` turns each batch
into token ids (Rust batch encoding across cores, word cache), and a second thread feeds the
batches to the native builder, whose sorting of full buffers (the spills) then overlaps the
tokenization of the next batches. ``finish`` merges and writes the file.

Interrupting (Ctrl-C, or a SIGTERM turned into an exception as ``kcore build-trie`` does) stops
every stage within a fraction of a second, including the native merge, and leaves nothing: the
builder's scratch files are unnamed and the output is linked under its name only when complete.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable, Iterable, List, Optional

from kcore._native import native
from kcore.errors import InvalidInputError

__all__ = ["build_from_text", "DEFAULT_MEMORY_BUDGET"]

DEFAULT_MEMORY_BUDGET = 1 << 30


class _Stopped(Exception):
    """The producer side stopped: the builder thread must end its current spill now."""


def check_output_path(path) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):  # checked now, not after a long build when the rename fails
        raise IsADirectoryError(f"cannot write the trie to '{path}': it is a directory; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write the trie to '{path}': folder '{folder}' does not exist")
    return path


def check_budget(memory_budget_bytes) -> int:
    import numpy as np

    if isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, (int, np.integer)) or memory_budget_bytes < 1:
        raise InvalidInputError(f"memory_budget_bytes must be a positive int, got {memory_budget_bytes!r}")
    return int(memory_budget_bytes)


def run_builder(
    chunks: Iterable,
    path,
    *,
    vocab_size: int,
    tokenizer_fingerprint: str = "",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
    tmp_dir=None,
    total: Optional[int] = None,
    estimate_total: Optional[Callable[[], Optional[int]]] = None,
    desc: str = "reading facts",
    timers: Optional[dict] = None,
) -> dict:
    """Feed ``(tokens, offsets)`` chunks to a native builder on a second thread, then finish.

    Returns the build statistics, with the seconds spent producing the chunks (``produce_s``:
    reading and tokenizing), adding them (``add_s``, on the builder thread), finishing
    (``finish_s``) and in all (``wall_s``).
    """
    from tqdm.auto import tqdm

    path = check_output_path(path)
    memory_budget_bytes = check_budget(memory_budget_bytes)
    if not isinstance(tokenizer_fingerprint, str):
        raise InvalidInputError(f"tokenizer_fingerprint must be a str, got {type(tokenizer_fingerprint).__name__}")
    tmp_dir = os.fspath(tmp_dir) if tmp_dir is not None else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(tmp_dir):
        raise FileNotFoundError(f"tmp_dir '{tmp_dir}' is not a folder")
    t_start = time.perf_counter()
    builder = native().TrieBuilder(vocab_size, memory_budget_bytes, tmp_dir)
    stop = threading.Event()

    def cancel_check(phase, done):
        if stop.is_set():
            raise _Stopped()

    builder.progress = cancel_check
    work: "queue.Queue" = queue.Queue(maxsize=4)
    failure: List[BaseException] = []
    add_s = [0.0]

    def consume():
        try:
            while True:
                item = work.get()
                if item is None:
                    return
                t0 = time.perf_counter()
                builder.add(*item)
                add_s[0] += time.perf_counter() - t0
        except BaseException as e:  # handed to the producer, which raises it
            failure.append(e)

    thread = threading.Thread(target=consume, name="kcore-trie-builder", daemon=True)
    thread.start()

    def put(item):
        while True:
            if failure:
                raise failure[0]
            try:
                work.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    produce_s = 0.0
    try:
        with tqdm(total=total, unit=" facts", unit_scale=True, desc=desc, disable=not progress, smoothing=0.05) as bar:
            it = iter(chunks)
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    produce_s += time.perf_counter() - t0
                    break
                produce_s += time.perf_counter() - t0
                put(item)
                bar.update(item[1].size - 1)
                if estimate_total is not None:
                    est = estimate_total()
                    if est:
                        bar.total = max(est, bar.n)
            put(None)
            thread.join()
            if failure:
                raise failure[0]
        t_finish = time.perf_counter()
        stats = _finish(builder, path, tokenizer_fingerprint, progress)
    except BaseException:
        stop.set()
        try:  # let the builder thread see the end even if the queue is full
            while True:
                work.get_nowait()
        except queue.Empty:
            pass
        work.put(None)
        thread.join()
        builder = None  # frees the scratch files now, not when the traceback goes
        raise
    now = time.perf_counter()
    stats.update(produce_s=produce_s, add_s=add_s[0], finish_s=now - t_finish, wall_s=now - t_start)
    if timers:
        stats.update(timers)
    return stats


def _finish(builder, path, fingerprint, progress) -> dict:
    from tqdm.auto import tqdm

    total = builder.num_added
    with tqdm(total=total, unit=" facts", unit_scale=True, desc="building trie", disable=not progress, smoothing=0.05) as bar:

        def report(phase, done):
            # Runs on this thread with the GIL: the binding has just run pending signal handlers.
            if phase == 1:
                bar.update(min(done, total) - bar.n)
            elif phase == 2 and bar.n < total:
                bar.update(total - bar.n)
                bar.set_postfix_str("writing", refresh=True)

        builder.progress = report
        stats = builder.finish(path, fingerprint)
        bar.update(total - bar.n)
        bar.set_postfix_str(f"{stats['num_facts']} distinct facts, {stats['file_bytes']} bytes", refresh=True)
    return stats


def build_from_text(
    batches: Iterable[List[str]],
    tokenizer,
    path,
    *,
    leading_space: bool = True,
    word_cache: Optional[bool] = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
    tmp_dir=None,
    total: Optional[int] = None,
    estimate_total: Optional[Callable[[], Optional[int]]] = None,
) -> dict:
    """Tokenize batches of fact strings and build the trie file (see the module docs).

    Args:
        batches: an iterable of lists of fact strings.
        tokenizer: a Hugging Face tokenizer (its length is the vocab size; its fingerprint is
            recorded).
        leading_space, word_cache: as :class:`kcore.fact_tokenizer.FactTokenizer`.
        total / estimate_total: number of facts (or a callable estimating it) for the progress
            bar's ETA.

    Returns:
        the build statistics (``kcore.FactTrie.build_stats``), with ``tokenize_s`` and
        ``tokenizer_s`` (the tokenizer library's own share) added to :func:`run_builder`'s.
    """
    from kcore.fact_tokenizer import FactTokenizer
    from kcore.tokenizer import tokenizer_fingerprint

    ft = FactTokenizer(tokenizer, leading_space=leading_space, word_cache=word_cache)
    fingerprint = tokenizer_fingerprint(tokenizer)
    vocab_size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.get_vocab_size(with_added_tokens=True)
    tokenize_s = [0.0]

    def chunks():
        index = 0
        for batch in batches:
            if not batch:
                continue
            t0 = time.perf_counter()
            tokens, offsets = ft.encode(batch, index)
            tokenize_s[0] += time.perf_counter() - t0
            index += len(batch)
            yield tokens, offsets

    stats = run_builder(
        chunks(),
        path,
        vocab_size=vocab_size,
        tokenizer_fingerprint=fingerprint,
        memory_budget_bytes=memory_budget_bytes,
        progress=progress,
        tmp_dir=tmp_dir,
        total=total,
        estimate_total=estimate_total,
        desc="tokenizing facts",
    )
    stats.update(tokenize_s=tokenize_s[0], tokenizer_s=ft.tokenizer_seconds, word_cache=ft.word_cache)
    return stats
