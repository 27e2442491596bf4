"""Real English text for kcore's perplexity measurements, found in installed packages.

* ``lee_background``: the Lee background news corpus (300 Australian news articles, about 60k
  words; Lee, Pincombe & Welsh 2005) shipped as test data in the ``gensim`` wheel. Located through
  package metadata; gensim itself is never imported.
* ``fortunes``: Debian's ``fortunes`` files (``/usr/share/games/fortunes``), one document per
  ``%``-separated entry, if the package is installed.
"""

from __future__ import annotations

import importlib.metadata
import random
from pathlib import Path
from typing import Dict, List, Sequence

from kcore.errors import KcoreError

FORTUNES_DIR = Path("/usr/share/games/fortunes")


def lee_background_path() -> Path:
    """Path of ``lee_background.cor`` inside the installed gensim package.

    Raises:
        KcoreError: gensim is not installed (install it with ``pip install --no-deps gensim``).
    """
    try:
        dist = importlib.metadata.distribution("gensim")
    except importlib.metadata.PackageNotFoundError:
        raise KcoreError("the Lee news corpus ships in gensim: install it with `pip install --no-deps gensim`") from None
    for f in dist.files or ():
        if str(f).endswith("test_data/lee_background.cor"):
            return Path(dist.locate_file(f))
    raise KcoreError("gensim is installed but holds no test_data/lee_background.cor")


def load_documents(name: str = "lee_background") -> List[str]:
    """The documents of a corpus, one string each, whitespace-normalised, empty ones dropped.

    Args:
        name: ``"lee_background"`` (one article per line) or ``"fortunes"``.

    Raises:
        KcoreError: unknown name or corpus not installed.
    """
    if name == "lee_background":
        text = lee_background_path().read_text(encoding="utf-8", errors="replace")
        docs = text.splitlines()
    elif name == "fortunes":
        if not FORTUNES_DIR.is_dir():
            raise KcoreError(f"Debian's fortunes are not installed ({FORTUNES_DIR} missing): apt-get install fortunes")
        docs = []
        for f in sorted(FORTUNES_DIR.iterdir()):
            if f.is_file() and not f.suffix:
                docs += f.read_text(encoding="utf-8", errors="replace").split("\n%\n")
    else:
        raise KcoreError(f"unknown corpus {name!r}: choose 'lee_background' or 'fortunes'")
    docs = [" ".join(d.split()) for d in docs]
    return [d for d in docs if d]


def split_documents(
    docs: Sequence[str], *, dev: float = 0.1, test: float = 0.1, seed: int = 0
) -> Dict[str, List[str]]:
    """Split documents (never inside a document) into ``train`` / ``dev`` / ``test`` by a seeded
    shuffle; ``dev`` and ``test`` are fractions of the documents (at least one each).

    Held-out documents that repeat a train document (or an earlier held-out one) verbatim are
    dropped: the Lee corpus holds 7 repeated articles, and a repeat in the test set would let a
    memory copy it and inflate the measured gain."""
    if not 0 < dev < 1 or not 0 < test < 1 or dev + test >= 1:
        raise KcoreError(f"dev and test must be fractions in (0, 1) with dev + test < 1, got {dev}, {test}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_dev, n_test = max(1, round(dev * len(docs))), max(1, round(test * len(docs)))
    if n_dev + n_test >= len(docs):
        raise KcoreError(f"{len(docs)} documents are too few to split")
    train = [docs[i] for i in sorted(order[n_dev + n_test :])]
    seen = set(train)

    def held_out(idx):
        out = []
        for i in sorted(idx):
            if docs[i] not in seen:
                seen.add(docs[i])
                out.append(docs[i])
        return out

    return {"dev": held_out(order[:n_dev]), "test": held_out(order[n_dev : n_dev + n_test]), "train": train}
