"""``kvcache calibrate``: fit the router's latency JSON to the engine's real batched steps.

The JSON has exactly the fields of ``kvcache.costs.LatencyModel``; ``kvcache replay
--latency FILE`` reads it, so simulated workers run at this model's measured speed. Its batching
limits are written as given, by default the batched engine's (``costs.ENGINE_MAX_NUM_SEQS``,
``costs.ENGINE_MAX_NUM_BATCHED_TOKENS``): the file describes the engine it was fitted on.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

from kvcache.cache.config import DEFAULT_BLOCK_SIZE
from kvcache.commands import _argtypes as argtypes
from kvcache.costs import ENGINE_MAX_NUM_BATCHED_TOKENS, ENGINE_MAX_NUM_SEQS
from kvcache.model.registry import DEFAULT_MODEL

HELP = "measure a model's prefill and decode speed through the engine; write the router's latency JSON"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"{DEFAULT_MODEL} (default), tiny, tiny-<family>, a local path"
    )
    parser.add_argument(
        "--out", type=argtypes.output_path, default="latency.json", help="where to write the JSON"
    )
    parser.add_argument(
        "--new-tokens", type=_ints, default=[32, 128, 512], help="prefill lengths, comma-separated"
    )
    parser.add_argument("--contexts", type=_ints, default=[0, 512, 2048], help="cached context lengths")
    parser.add_argument("--batches", type=_ints, default=[1, 4, 16], help="decode batch sizes")
    parser.add_argument("--decode-ctx", type=argtypes.positive_int, default=512)
    parser.add_argument("--repeats", type=argtypes.positive_int, default=3)
    parser.add_argument(
        "--max-num-seqs",
        type=argtypes.positive_int,
        default=ENGINE_MAX_NUM_SEQS,
        help="written as-is: the worker's batch cap (the engine's)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=argtypes.positive_int,
        default=ENGINE_MAX_NUM_BATCHED_TOKENS,
        help="written as-is: tokens per step cap (the engine's)",
    )
    parser.add_argument(
        "--max-batched-tokens",
        action=argtypes.Renamed,
        new="--max-num-batched-tokens",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=argtypes.positive_int, default=1, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    import torch

    from kvcache.engine import Engine, EngineConfig
    from kvcache.lab import tables
    from kvcache.lab.calibration import fit, measure, predict_ms
    from kvcache.lab.tables import Column

    torch.set_num_threads(args.threads)
    longest = max(args.contexts) + max(args.new_tokens)
    block_size = DEFAULT_BLOCK_SIZE
    num_blocks = len(args.contexts) * len(args.new_tokens) * (args.repeats + 2)
    num_blocks *= 2 * (longest // block_size + 1)
    num_blocks += max(args.batches) * (args.decode_ctx + args.repeats + block_size) // block_size
    config = EngineConfig(
        num_blocks=num_blocks,
        block_size=block_size,
        device=args.device,
        dtype=args.dtype,
        max_num_batched_tokens=max(max(args.new_tokens), args.decode_ctx),
        max_num_seqs=max(args.batches),
    )
    engine = Engine.load(args.model, config)
    samples = measure(
        engine,
        new_tokens=args.new_tokens,
        contexts=args.contexts,
        batches=args.batches,
        decode_ctx=args.decode_ctx,
        repeats=args.repeats,
    )
    latency = fit(samples, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    print(
        f"model {engine.model_id} on {engine.device} {str(engine.dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{len(samples)} steps; by shape (median measured vs fitted ms):")
    shapes: dict[tuple[int, int, int], tuple[Any, list[float]]] = {}  # shape -> (first step, seconds)
    for r in samples:
        shape = (r.num_prefill_tokens, r.num_decode_seqs, r.num_context_tokens)
        shapes.setdefault(shape, (r, []))[1].append(r.seconds)
    columns = (
        Column("prompt tok", lambda s: s[0].num_prefill_tokens),
        Column("decode seqs", lambda s: s[0].num_decode_seqs),
        Column("context tok", lambda s: s[0].num_context_tokens),
        Column("steps", lambda s: len(s[1])),
        Column("measured ms", lambda s: 1000 * statistics.median(s[1]), ".2f"),
        Column("fitted ms", lambda s: predict_ms(latency, s[0]), ".2f"),
    )
    print(tables.plain(columns, [shapes[k] for k in sorted(shapes)]))
    latency.to_json(args.out)
    print(f"wrote {args.out}: {latency}")
    return 0
