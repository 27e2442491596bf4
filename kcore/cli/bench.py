"""``kcore bench``: run one of the microbenchmark scripts in benchmarks/ (from a source checkout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kcore.errors import KcoreError


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (source checkout)")
    p.add_argument("name", help="benchmark name, e.g. 'trie' for benchmarks/bench_trie.py")
    p.add_argument("args", nargs="*", help="arguments passed to the script")
    p.set_defaults(func=run)


def run(args) -> int:
    root = Path(__file__).resolve().parents[2]
    script = root / "benchmarks" / f"bench_{args.name}.py"
    if not script.exists():
        available = sorted(p.stem[len("bench_"):] for p in (root / "benchmarks").glob("bench_*.py"))
        raise KcoreError(f"no benchmark {args.name!r} at {script}; available: {available or 'none (not a source checkout)'}")
    return subprocess.call([sys.executable, str(script), *args.args])
