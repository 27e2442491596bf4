"""kcore.models: a GGUF is converted once into the cache (keyed by its digest), into a plain
Hugging Face folder that transformers and vLLM both load; older conversions are refreshed."""

from __future__ import annotations

import json
import os
import threading

import pytest

import kcore.models as models
from kcore.errors import KcoreError


@pytest.fixture()
def fake_convert(monkeypatch, tmp_path):
    """Replace the (17 s) real conversion by one that writes a marked folder and counts calls; the
    cache logic around it is the real one."""
    monkeypatch.setenv("KCORE_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(gguf, folder):
        calls.append(gguf.name)
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


def test_gguf_converted_once_keyed_by_digest(fake_convert, tmp_path):
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF one")
    first = models.model_folder(str(gguf), progress=False)
    assert first == models.cache_dir() / "models" / f"m.Q4-{models._file_sha256(gguf)[:16]}"
    assert models.model_folder(str(gguf), progress=False) == first
    assert len(fake_convert) == 1
    # same content under another path: same folder, no conversion
    other = tmp_path / "sub" / "m.Q4.gguf"
    other.parent.mkdir()
    other.write_bytes(b"GGUF one")
    assert models.model_folder(str(other), progress=False) == first and len(fake_convert) == 1
    # changed content: a new folder
    gguf.write_bytes(b"GGUF two")
    second = models.model_folder(str(gguf), progress=False)
    assert second != first and len(fake_convert) == 2


def test_older_conversion_is_refreshed(fake_convert, tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    dest = models.cache_dir() / "models" / f"m-{models._file_sha256(gguf)[:16]}"
    # a folder from conversion version 1: config.json, no marker
    dest.mkdir(parents=True)
    (dest / "config.json").write_text('{"quantization_config": {"quant_method": "gguf"}}')
    (dest / "stale.txt").write_text("x")
    assert models.model_folder(str(gguf)) == dest
    assert "older conversion" in capsys.readouterr().err
    assert len(fake_convert) == 1
    assert json.loads((dest / models.MARKER).read_text())["version"] == models.CONVERSION_VERSION
    assert not (dest / "stale.txt").exists()
    # a marker of another version is refreshed too
    marker = json.loads((dest / models.MARKER).read_text())
    (dest / models.MARKER).write_text(json.dumps(dict(marker, version=models.CONVERSION_VERSION - 1)))
    models.model_folder(str(gguf), progress=False)
    assert len(fake_convert) == 2
    # no temporary or old folder left behind
    assert sorted(p.name for p in dest.parent.iterdir() if not p.name.endswith(".lock")) == [dest.name]


def test_concurrent_first_use_converts_once(fake_convert, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = []
    threads = [threading.Thread(target=lambda: out.append(models.model_folder(str(gguf), progress=False))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 1 and len(out) == 4
    assert len(fake_convert) == 1


def test_model_folder_errors(tmp_path):
    with pytest.raises(KcoreError, match="not found"):
        models.model_folder(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KcoreError, match="config.json"):
        models.model_folder(str(tmp_path / "empty"))
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(KcoreError, match="not a file"):
        models.model_folder(str(tmp_path / "d.gguf"))


@pytest.mark.slow
def test_default_folder_is_a_plain_checkpoint_equal_to_the_gguf(smollm2):
    """The cached folder: no GGUF quantization_config, architectures set, the tied embedding stored
    under the input-embedding name, and the same logits as transformers' own GGUF load."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    folder = models.model_folder()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert json.loads((folder / models.MARKER).read_text())["version"] == models.CONVERSION_VERSION
    assert os.stat(folder).st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in folder.iterdir())

    gguf = models.smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tokenizer("Fact: Japan capital Tokyo .\nAnswer:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = model(ids).logits
        want = reference(ids).logits
    assert torch.equal(got, want)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
