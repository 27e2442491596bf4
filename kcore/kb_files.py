"""Streaming knowledge-base files: facts read line by line, plain or compressed, any size.

A knowledge-base file is read as a stream of fact strings in bounded memory (one batch of lines
at a time), so a KB of hundreds of millions of facts never has to fit in memory.

Formats (from the suffix before any compression suffix):

* ``.tsv``: one triple per line, ``subject<TAB>relation<TAB>object``; a first line
  ``subject<TAB>relation<TAB>object`` is a header;
* ``.jsonl``: one JSON object per line, ``{"subject": ..., "relation": ..., "object": ...}``, or a
  3-element list; numbers are written as JSON writes them;
* ``.txt``: facts already verbalized, one per line (whitespace runs become one space).

Blank lines and lines starting with ``#`` are skipped in every format. Triples are verbalized
with a template (``"{subject} {relation} {object} ."`` by default; see :func:`kcore.kb.verbalize`).

Compression (from the last suffix): ``.gz`` (gzip), ``.bz2``, ``.xz`` (lzma), ``.zst``
(Zstandard, needs the ``zstandard`` package), or none.

Bad lines (not UTF-8, wrong number of fields, an empty field, invalid JSON) are reported with the
file and line number: ``bad_lines="error"`` (default) raises :class:`kcore.FileFormatError` at
the first; ``bad_lines="skip"`` skips them, counts them in :class:`ReadReport` and keeps the first
messages; nothing is dropped silently.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

from kcore.errors import FileFormatError, InvalidInputError, KcoreError

__all__ = ["FORMATS", "COMPRESSIONS", "ReadReport", "kb_format", "open_binary", "iter_fact_batches", "iter_facts"]

FORMATS = ("tsv", "jsonl", "txt")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
DEFAULT_TEMPLATE = "{subject} {relation} {object} ."
_MAX_EXAMPLES = 20


@dataclass
class ReadReport:
    """What a read saw: filled in while the facts stream (readable at any time).

    Attributes:
        path: the file.
        lines: lines read so far.
        facts: facts yielded (duplicates included: the trie builder removes them).
        bad_lines: lines skipped as malformed (``bad_lines="skip"``).
        examples: ``"file:line: reason"`` of the first 20 bad lines.
        bytes_read: bytes of the file (compressed, as stored) consumed so far.
        file_bytes: size of the file.
    """

    path: str
    lines: int = 0
    facts: int = 0
    bad_lines: int = 0
    examples: List[str] = field(default_factory=list)
    bytes_read: int = 0
    file_bytes: int = 0


def kb_format(path: Union[str, Path], format: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """``(format, compression)`` of a KB file from its suffixes, e.g. ``kb.tsv.zst`` -> ``("tsv", "zstd")``.

    Raises:
        InvalidInputError: an unknown format (names the file and the accepted suffixes).
    """
    name = Path(path).name.lower()
    compression = None
    for suffix, kind in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression = kind
            name = name[: -len(suffix)]
            break
    fmt = format or Path(name).suffix.lstrip(".")
    if fmt not in FORMATS:
        raise InvalidInputError(
            f"format must be one of {', '.join(FORMATS)} (from the file suffix, optionally followed by "
            f"{', '.join(COMPRESSIONS)}), got {fmt!r} for {str(path)!r}"
        )
    return fmt, compression


class _CountingReader(io.RawIOBase):
    """The raw file, counting the bytes read (the progress of a compressed stream)."""

    def __init__(self, f):
        self._f = f
        self.count = 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self._f.readinto(b)
        self.count += n or 0
        return n

    def close(self):
        self._f.close()
        super().close()


def open_binary(path: Union[str, Path], compression: Optional[str]):
    """A buffered binary stream of the decompressed file and its byte counter.

    Returns:
        ``(stream, counter)``: iterate ``stream`` for lines (bytes); ``counter.count`` is the
        number of bytes of the file read so far.

    Raises:
        KcoreError: the file does not exist, or ``.zst`` without the ``zstandard`` package.
    """
    try:
        raw = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise KcoreError(f"knowledge-base file {str(path)!r} not found") from None
    counter = _CountingReader(raw)
    buffered = io.BufferedReader(counter, buffer_size=1 << 20)
    if compression is None:
        return buffered, counter
    if compression == "gzip":
        import gzip

        stream = gzip.GzipFile(fileobj=buffered, mode="rb")
    elif compression == "bz2":
        import bz2

        stream = bz2.BZ2File(buffered, mode="rb")
    elif compression == "xz":
        import lzma

        stream = lzma.LZMAFile(buffered, mode="rb")
    else:
        try:
            import zstandard
        except ImportError:
            buffered.close()
            raise KcoreError(
                f"{str(path)!r} is Zstandard-compressed: reading it needs the zstandard package "
                "(pip install zstandard, or pip install 'kcore[hf]')"
            ) from None
        stream = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
    return io.BufferedReader(stream, buffer_size=1 << 20), counter


def _decompress_error(path, compression, e) -> FileFormatError:
    return FileFormatError(f"{path}: cannot read it as {compression}-compressed data ({type(e).__name__}: {e})")


class _Bad(Exception):
    pass


def _verbalizer(template: str):
    if template == DEFAULT_TEMPLATE:  # the common case, without str.format's parsing
        return lambda s, r, o: " ".join(f"{s} {r} {o} .".split())
    from kcore.kb import Triple, verbalize

    # Checked once, on a sample triple, so a bad template fails before any line is read.
    verbalize(Triple("s", "r", "o"), template)
    return lambda s, r, o: " ".join(template.format(subject=s, relation=r, object=o).split())


def _fields_of_json(line: str):
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Bad(f"invalid JSON ({e.msg})") from None
    if isinstance(obj, dict):
        missing = [k for k in ("subject", "relation", "object") if k not in obj]
        if missing:
            raise _Bad(f"JSON object lacks {missing}")
        fields = [obj["subject"], obj["relation"], obj["object"]]
    elif isinstance(obj, list):
        fields = obj
    else:
        raise _Bad(f"expected a JSON object or list, got {type(obj).__name__}")
    return [v if isinstance(v, str) else json.dumps(v) if not isinstance(v, (int, float)) else str(v) for v in fields]


_NAMES = ("subject", "relation", "object")


def iter_fact_batches(
    path: Union[str, Path],
    *,
    template: str = DEFAULT_TEMPLATE,
    bad_lines: str = "error",
    batch_size: int = 8192,
    format: Optional[str] = None,
    report: Optional[ReadReport] = None,
) -> Iterator[List[str]]:
    """Read a KB file as batches of verbalized fact strings (file order, duplicates kept).

    Args:
        path: a ``.tsv`` / ``.jsonl`` / ``.txt`` file, optionally ``.gz`` / ``.bz2`` / ``.xz`` / ``.zst``.
        template: verbalization of triples (ignored for ``.txt``).
        bad_lines: ``"error"`` (raise at the first malformed line) or ``"skip"`` (count it in
            ``report`` and go on).
        batch_size: facts per yielded list (the memory held at once).
        format: override the format read from the suffix.
        report: a :class:`ReadReport` to fill in while reading (one is made if None).

    Yields:
        lists of at most ``batch_size`` fact strings.

    Raises:
        KcoreError: the file does not exist.
        FileFormatError: a malformed line with ``bad_lines="error"`` (``"file:line: reason"``), or
            corrupted compressed data.
        InvalidInputError: unknown format, bad template or bad_lines value.
    """
    if bad_lines not in ("error", "skip"):
        raise InvalidInputError(f"bad_lines must be 'error' or 'skip', got {bad_lines!r}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    fmt, compression = kb_format(path, format)
    verbalize = _verbalizer(template) if fmt != "txt" else None
    if report is None:
        report = ReadReport(str(path))
    try:
        report.file_bytes = os.path.getsize(path)
    except OSError:
        pass
    stream, counter = open_binary(path, compression)
    batch: List[str] = []
    lineno = 0
    try:
        with stream:
            lines = iter(stream)
            while True:
                try:
                    raw = next(lines)
                except StopIteration:
                    break
                except Exception as e:  # OSError, EOFError, lzma.LZMAError, zstandard.ZstdError, ...
                    if compression is None:
                        raise
                    raise _decompress_error(path, compression, e) from None
                lineno += 1
                try:
                    try:
                        line = raw.decode("utf-8").rstrip("\r\n")
                    except UnicodeDecodeError as e:
                        raise _Bad(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
                    stripped = line.strip()
                    if not stripped or stripped.startswith("#"):
                        continue
                    if fmt == "txt":
                        fact = " ".join(stripped.split())
                    else:
                        if fmt == "tsv":
                            fields = line.split("\t")
                            if lineno == 1 and [x.strip().lower() for x in fields] == list(_NAMES):
                                continue
                        else:
                            fields = _fields_of_json(line)
                        if len(fields) != 3:
                            raise _Bad(f"expected 3 fields (subject, relation, object), got {len(fields)}")
                        s, r, o = (x.strip() for x in fields)
                        if not (s and r and o):
                            empty = [n for n, v in zip(_NAMES, (s, r, o)) if not v]
                            raise _Bad(f"empty {' and '.join(empty)}")
                        if "\n" in s + r + o or "\t" in s + r + o:
                            raise _Bad("a field holds a newline or a tab")
                        fact = verbalize(s, r, o)
                except _Bad as e:
                    message = f"{path}:{lineno}: {e}"
                    if bad_lines == "error":
                        raise FileFormatError(message) from None
                    report.bad_lines += 1
                    if len(report.examples) < _MAX_EXAMPLES:
                        report.examples.append(message)
                    continue
                batch.append(fact)
                if len(batch) == batch_size:
                    report.lines, report.bytes_read = lineno, counter.count
                    report.facts += len(batch)
                    yield batch
                    batch = []
    finally:
        report.lines, report.bytes_read = lineno, counter.count
    if batch:
        report.facts += len(batch)
        yield batch


def iter_facts(path: Union[str, Path], **kwargs) -> Iterator[str]:
    """The facts of a KB file one by one (same arguments as :func:`iter_fact_batches`)."""
    for batch in iter_fact_batches(path, **kwargs):
        yield from batch
