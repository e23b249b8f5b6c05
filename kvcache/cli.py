"""The ``kvcache`` command: parses arguments and hands them to one subcommand module.

A thin shell over the library: each subcommand is a module ``kvcache.commands.<name>`` with a
one-line ``HELP``, an ``add_parser(parser)`` and a ``run(args)``. Modules are found on disk; a
module name's underscores become dashes on the command line (``bench_serve`` -> ``bench-serve``).
Command modules import heavy libraries (torch, transformers) inside ``run``, so ``kvcache --help``
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import kvcache.commands
from kvcache.errors import KVCacheError


def commands() -> dict[str, str]:
    """Command name -> module name, for every module in ``kvcache.commands``."""
    found = pkgutil.iter_modules(kvcache.commands.__path__)
    return {info.name.replace("_", "-"): info.name for info in sorted(found, key=lambda i: i.name)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcache",
        description="Share KV-cache blocks across sessions and tenants, route requests by prefix affinity, "
        "spill cold blocks down a memory hierarchy. With no command, runs the demo.",
        epilog="Run 'kvcache COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in commands().items():
        module = importlib.import_module(f"kvcache.commands.{module_name}")
        help_text = module.HELP
        module.add_parser(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    module = importlib.import_module(f"kvcache.commands.{commands()[args.command]}")
    try:
        return int(module.run(args) or 0)
    except KVCacheError as exc:
        print(f"kvcache {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
