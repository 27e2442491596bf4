"""The ``kcore`` command line. Each subcommand lives in its own module in this package and
exposes ``register(subparsers)``, which adds its parser and sets ``func(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from kcore.errors import KcoreError

# Module names in kcore.cli, in the order they appear in --help.
COMMANDS = ("ask", "build_trie", "build_datastore", "perplexity", "memory_generate", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kcore", description="Knowledge-augmented LLM decoding with native kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"kcore.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    # kcore never downloads: models and data come from local folders or installed packages.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KcoreError as e:
        print(f"kcore {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
