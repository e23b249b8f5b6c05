"""``kvcache models``: the model names ``--model`` takes, and converting a registry model ahead of time.

kvcache models                      # registry models (converted or not, size) and random-weight configs
kvcache models prepare smollm2-135m # convert now (a server's workers then start without converting)
"""

from __future__ import annotations

import argparse

HELP = "list the models --model takes (converted or not, size); 'prepare NAME' converts one ahead of time"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="list", choices=["list", "prepare"])
    parser.add_argument("name", nargs="?", help="the registry model to prepare")


def run(args: argparse.Namespace) -> int:
    from kvcache.errors import ConfigError
    from kvcache.lab import tables
    from kvcache.lab.tables import Column
    from kvcache.model import registry as models

    if args.action == "prepare":
        if args.name is None:
            raise ConfigError(f"kvcache models prepare NAME: name one of {', '.join(models.REGISTRY)}")
        folder = models.prepare(args.name)
        status = models.status(args.name)
        print(f"{args.name}: ready in {folder} ({status.size_bytes / 2**20:.0f} MiB)")
        return 0
    if args.name is not None:
        raise ConfigError(f"kvcache models takes a name only after 'prepare', got {args.name!r}")
    print(f"converted checkpoints live in {models.home()} (set KVCACHE_HOME to move them)")
    columns = (
        Column("name", 0, align="<"),
        Column("weights", 1, align="<"),
        Column("converted", 2, align="<"),
        Column("size MiB", 3),
        Column("description", 4, align="<"),
    )
    rows, hints = [], []  # hints[i]: how to install rows[i]'s weights, "" when installed
    for name in models.REGISTRY:
        s = models.status(name)
        size = f"{s.size_bytes / 2**20:.0f}" if s.prepared else "-"
        weights = "installed" if s.installed else "missing"
        rows.append((name, weights, "yes" if s.prepared else "no", size, s.description))
        hints.append("" if s.installed else models.spec(name).install_hint)
    for name in models.random_weight_names():
        rows.append((name, "random", "-", "-", "random weights from a config, for tests"))
        hints.append("")
    head, *lines = tables.plain(columns, rows).splitlines()
    indent = head.index("weights")  # the hint starts under the weights column
    print(head)
    for line, hint in zip(lines, hints, strict=True):
        print(line)
        if hint:
            print(f"{'':<{indent}}install with: {hint}")
    return 0
