import subprocess
import sys

import pytest

import kcore
from kcore._native import native


def test_extension_imports_and_reports_cuda():
    mod = native()
    assert isinstance(mod.cuda_compiled, bool)


def test_public_names_resolve_lazily():
    assert kcore.FileFormatError.__mro__[1] is kcore.KcoreError
    with pytest.raises(AttributeError):
        kcore.does_not_exist


def test_import_kcore_does_not_import_transformers_or_triton():
    code = "import sys, kcore, kcore.ops; print('transformers' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "kcore", "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("ask", "build-trie", "build-datastore", "perplexity", "memory-generate", "bench"):
        assert name in out
