"""Tokenizer fingerprints: files built for one tokenizer refuse to load for another."""

from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> str:
    """Return a hex SHA-256 fingerprint of a tokenizer's vocabulary and special tokens.

    Accepts a Hugging Face ``PreTrainedTokenizer(Fast)`` / ``TokenizersBackend`` or a
    ``tokenizers.Tokenizer``. Two tokenizers with the same token -> id map and the same special
    tokens get the same fingerprint, whatever their file layout; any change of id gives another.

    Raises:
        TypeError: the object has no ``get_vocab()``.
    """
    if not hasattr(tokenizer, "get_vocab"):
        raise TypeError(f"tokenizer must have get_vocab(), got {type(tokenizer).__name__}")
    vocab = tokenizer.get_vocab()
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    special = {}
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            special[attr] = str(value)
    payload = json.dumps({"vocab": items, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
