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


def test_type_stubs_match_the_extension():
    """kcore/_C.pyi (regenerate with scripts/gen_stubs.sh) names exactly the extension's functions,
    classes and attributes; CUDA-only functions may be missing from a CPU build."""
    import ast
    from importlib import resources

    pkg = resources.files("kcore")
    assert pkg.joinpath("py.typed").is_file()
    tree = ast.parse(pkg.joinpath("_C.pyi").read_text())
    stub = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    stub |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
             and ast.unparse(n.annotation) != "typing.TypeAlias"}  # aliases (TensorArg) name argument types
    stub.discard("__all__")
    mod = native()
    public = {n for n in dir(mod) if not n.startswith("__")}
    assert public - stub == set(), "in the extension, not in kcore/_C.pyi: run scripts/gen_stubs.sh"
    assert {n for n in stub - public if not n.endswith("_cuda")} == set(), "in kcore/_C.pyi only"


def test_show_config_reports_the_kernel_variant(capsys):
    info = kcore.show_config(mode="dicts")
    assert info["cpu"]["isa"] == native().cpu_features()["isa"]
    assert info["build"]["cuda_compiled"] == native().cuda_compiled
    kcore.show_config()
    out = capsys.readouterr().out
    assert f"kernel variant in use: {info['cpu']['isa']} (chosen by {info['cpu']['chosen_by']})" in out
    with pytest.raises(ValueError, match="mode must be"):
        kcore.show_config(mode="yaml")
