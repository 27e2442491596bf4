"""kcore.kb_files: KB files streamed line by line, every format and compression, bad lines."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import sys

import pytest

from kcore import kb_files
from kcore.errors import FileFormatError, InvalidInputError, KcoreError

TRIPLES = [
    ("Japan", "capital", "Tokyo"),
    ("France", "capital", "Paris"),
    ("New  York", "state", "New York"),  # whitespace runs become one space
    ("Zürich", "country", "Switzerland"),
    ("Japan", "population", "126529100"),
]
FACTS = [
    "Japan capital Tokyo .",
    "France capital Paris .",
    "New York state New York .",
    "Zürich country Switzerland .",
    "Japan population 126529100 .",
]


def _text(fmt: str) -> str:
    if fmt == "tsv":
        body = "subject\trelation\tobject\n# a comment\n\n" + "".join("\t".join(t) + "\n" for t in TRIPLES)
    elif fmt == "jsonl":
        rows = [dict(zip(("subject", "relation", "object"), t)) for t in TRIPLES[:3]]
        rows.append(list(TRIPLES[3]))
        rows.append({"subject": "Japan", "relation": "population", "object": 126529100})
        body = "# a comment\n" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        body = "# a comment\n\n" + "".join(f"  {f.replace(' ', '   ', 1)}\n" for f in FACTS)
    return body


def _write(path, data: bytes):
    name = str(path)
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith(".bz2"):
        data = bz2.compress(data)
    elif name.endswith(".xz"):
        data = lzma.compress(data)
    elif name.endswith(".zst"):
        zstandard = pytest.importorskip("zstandard")  # in the test extra; optional for kcore itself

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("compression", ["", ".gz", ".bz2", ".xz", ".zst"])
@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "txt"])
def test_every_format_and_compression(tmp_path, fmt, compression):
    path = tmp_path / f"kb.{fmt}{compression}"
    _write(path, _text(fmt).encode())
    report = kb_files.ReadReport(str(path))
    assert list(kb_files.iter_facts(path, report=report, batch_size=2)) == FACTS
    assert report.facts == len(FACTS) and report.bad_lines == 0
    assert report.bytes_read == path.stat().st_size == report.file_bytes


def test_format_from_suffixes():
    assert kb_files.kb_format("a/kb.tsv.zst") == ("tsv", "zstd")
    assert kb_files.kb_format("KB.JSONL.GZ") == ("jsonl", "gzip")
    assert kb_files.kb_format("facts.txt") == ("txt", None)
    with pytest.raises(InvalidInputError, match="format must be one of tsv, jsonl, txt.*'csv'.*x.csv.gz"):
        kb_files.kb_format("x.csv.gz")


def test_custom_template(tmp_path):
    path = tmp_path / "kb.tsv"
    path.write_text("Japan\tcapital\tTokyo\n")
    assert list(kb_files.iter_facts(path, template="{object} is the {relation} of {subject}.")) == [
        "Tokyo is the capital of Japan."
    ]
    with pytest.raises(InvalidInputError, match="template"):
        list(kb_files.iter_facts(path, template="{subject} {predicate}"))


BAD = [
    ("kb.tsv", b"Japan\tcapital\tTokyo\nJapan\tcapital\n", 2, "expected 3 fields"),
    ("kb.tsv", b"a\tb\tc\nx\t \tz\n", 2, "empty relation"),
    ("kb.tsv", b"a\tb\tc\nx\ty\tz\n\xff\xfe\tb\tc\n", 3, "not UTF-8"),
    ("kb.jsonl", b'{"subject": "a", "relation": "b", "object": "c"}\n{not json}\n', 2, "invalid JSON"),
    ("kb.jsonl", b'{"subject": "a", "object": "b"}\n', 1, r"JSON object lacks \['relation'\]"),
    ("kb.jsonl", b'["a", "b"]\n', 1, "expected 3 fields"),
    ("kb.txt", b"fine fact .\n\xc3\x28 broken\n", 2, "not UTF-8"),
]


@pytest.mark.parametrize("name, content, line, reason", BAD)
def test_bad_line_stops_with_file_and_line(tmp_path, name, content, line, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=rf"{path}:{line}: {reason}"):
        list(kb_files.iter_facts(path))


@pytest.mark.parametrize("name, content, line, reason", BAD)
def test_bad_line_skipped_and_counted(tmp_path, name, content, line, reason):
    path = tmp_path / (name + ".gz")
    _write(path, content + (b'["s", "r", "o"]\n' if "jsonl" in name else b"s\tr\to\n" if "tsv" in name else b"s r o\n"))
    report = kb_files.ReadReport(str(path))
    facts = list(kb_files.iter_facts(path, bad_lines="skip", report=report))
    assert report.bad_lines == 1 and len(report.examples) == 1
    assert report.examples[0].startswith(f"{path}:{line}: ") and reason.split("\\")[0] in report.examples[0]
    assert facts[-1] == "s r o ." if "txt" not in name else facts[-1] == "s r o"
    assert report.lines == content.count(b"\n") + 1


def test_skip_keeps_first_examples_and_counts_all(tmp_path):
    path = tmp_path / "kb.tsv"
    path.write_text("".join("only\ttwo\n" if i % 2 else f"s{i}\tr\to\n" for i in range(100)))
    report = kb_files.ReadReport(str(path))
    assert len(list(kb_files.iter_facts(path, bad_lines="skip", report=report))) == 50
    assert report.bad_lines == 50 and len(report.examples) == 20 and report.examples[0].startswith(f"{path}:2: ")


def test_corrupted_compressed_data(tmp_path):
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        path = tmp_path / f"kb.tsv{suffix}"
        _write(path, b"a\tb\tc\n" * 5000)
        data = bytearray(path.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 16] = b"\x00" * 16
        path.write_bytes(bytes(data[: len(data) - 3]))
        with pytest.raises(FileFormatError, match=rf"{path}: cannot read it as"):
            list(kb_files.iter_facts(path))


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(KcoreError, match="not found"):
        list(kb_files.iter_facts(tmp_path / "nope.tsv.gz"))
    (tmp_path / "kb.tsv").write_text("a\tb\tc\n")
    with pytest.raises(InvalidInputError, match="bad_lines"):
        list(kb_files.iter_facts(tmp_path / "kb.tsv", bad_lines="ignore"))


def test_zst_without_zstandard(tmp_path, monkeypatch):
    path = tmp_path / "kb.tsv.zst"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(KcoreError, match="needs the zstandard package"):
        list(kb_files.iter_facts(path))


def test_memory_stays_bounded_while_streaming(tmp_path):
    """Lines are read in batches: a reader holds one batch, not the file."""
    import os

    path = tmp_path / "kb.tsv.gz"
    with gzip.open(path, "wt", compresslevel=1) as f:
        for i in range(100_000):  # incompressible objects: a file several times the read buffers
            f.write(f"subject {i}\trelation\t{os.urandom(24).hex()}\n")
    assert path.stat().st_size > 3 << 20
    report = kb_files.ReadReport(str(path))
    batches = kb_files.iter_fact_batches(path, batch_size=1000, report=report)
    first = next(batches)
    assert len(first) == 1000 and report.facts == 1000 and 0 < report.bytes_read < path.stat().st_size / 2
    assert sum(len(b) for b in batches) == 99_000
