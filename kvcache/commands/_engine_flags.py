"""The flags of a worker's engine, declared once for ``kvcache worker`` and for ``kvcache serve``
(which hands them to the workers it starts): the same name, type and default for each knob."""

from __future__ import annotations

import argparse

from kvcache.cache.config import DEFAULT_BLOCK_SIZE
from kvcache.commands import _argtypes as argtypes
from kvcache.costs import ENGINE_MAX_NUM_SEQS

DTYPES = ("float32", "bfloat16", "float16")


def add_engine_flags(parser: argparse.ArgumentParser, *, of_workers: bool) -> None:
    """``--num-blocks --block-size --dtype --device --threads --no-pod-tier --max-waiting
    --max-num-seqs``; ``of_workers``: the help says "per worker" (``kvcache serve``)."""
    each = "per worker: " if of_workers else ""
    parser.add_argument("--num-blocks", type=int, default=1024, help=f"{each}device pool blocks")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per KV block")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="weights and KV dtype (default: bfloat16 on CUDA, float32 on CPU)"
    )
    parser.add_argument("--device", help="torch device, e.g. cpu, cuda (default: cuda if present)")
    parser.add_argument("--threads", type=int, default=1, help=f"{each}torch threads")
    parser.add_argument("--no-pod-tier", action="store_true", help="do not share blocks through Redis")
    parser.add_argument(
        "--max-waiting",
        type=argtypes.non_negative_int,
        default=64,
        help=f"{each}requests waiting for their first token before new ones get 503 + Retry-After",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=argtypes.positive_int,
        default=ENGINE_MAX_NUM_SEQS,
        help=f"{each}sequences in one batch (the engine's max_num_seqs)",
    )
    parser.add_argument(
        "--max-running", action=argtypes.Renamed, new="--max-num-seqs", help=argparse.SUPPRESS
    )


def given_flags(args: argparse.Namespace, dests: tuple[str, ...]) -> list[str]:
    """The engine flags among ``dests`` that ``args`` sets to something else than their default."""
    probe = argparse.ArgumentParser(add_help=False)
    add_engine_flags(probe, of_workers=False)
    return [f"--{dest.replace('_', '-')}" for dest in dests if getattr(args, dest) != probe.get_default(dest)]
