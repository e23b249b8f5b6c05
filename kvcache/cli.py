"""The ``kvcache`` command: parses arguments and hands them to one subcommand module.

A thin shell over the library: each subcommand lives in ``kvcache.commands.<name>`` and is
imported only when chosen, so ``kvcache --help`` stays fast and needs no torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kvcache.errors import KVCacheError

# name -> one-line help; each names a module in kvcache.commands
COMMANDS: dict[str, str] = {
    "demo": "replay multi-tenant chat sessions through a block manager and print hit rates",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcache", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"kvcache.commands.{name}")
        module.add_parser(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    module = importlib.import_module(f"kvcache.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except KVCacheError as exc:
        print(f"kvcache {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
