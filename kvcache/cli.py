"""The ``kvcache`` command: parses arguments and hands them to one subcommand module.

A thin shell over the library: each subcommand is a module ``kvcache.commands.<name>`` with a
one-line ``HELP``, an ``add_parser(parser)`` and a ``run(args)``. Modules are found on disk; a
module name's underscores become dashes on the command line (``bench_serve`` -> ``bench-serve``);
a module whose name starts with one (``_argtypes``) is a helper, not a command.
Command modules import heavy libraries (torch, transformers) inside ``run``, so ``kvcache --help``
stays fast.

Every option's help shows its default. Argument types from ``kvcache.commands._argtypes`` refuse bad values
while parsing; what a command raises later as a ``KVCacheError`` or an ``OSError`` (a file that cannot
be read, a port that cannot be bound) ends as one ``kvcache COMMAND: error: ...`` line and exit
status 2, never a traceback. Any other exception is a kvcache bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import kvcache.commands
from kvcache import __version__
from kvcache.errors import KVCacheError


def commands() -> dict[str, str]:
    """Command name -> module name, for every module in ``kvcache.commands``."""
    found = pkgutil.iter_modules(kvcache.commands.__path__)
    return {
        info.name.replace("_", "-"): info.name
        for info in sorted(found, key=lambda i: i.name)
        if not info.name.startswith("_")
    }


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default: X)`` to each option's help unless it has no default or already says it."""
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS:
            continue  # flags and unset options: nothing to show
        if "default" in (action.help or ""):
            continue
        action.help = f"{action.help or ''} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcache",
        description="Share KV-cache blocks across sessions and tenants, route requests by prefix affinity, "
        "spill cold blocks down a memory hierarchy. With no command, runs the demo.",
        epilog="Run 'kvcache COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"kvcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in commands().items():
        module = importlib.import_module(f"kvcache.commands.{module_name}")
        help_text = module.HELP
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_parser(command)
        _show_defaults(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    module = importlib.import_module(f"kvcache.commands.{commands()[args.command]}")
    try:
        return int(module.run(args) or 0)
    except (KVCacheError, OSError) as exc:
        print(f"kvcache {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
