"""``kvcache bench-serve URL --trace FILE --rate R --duration S``: load a server, report like vllm."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from kvcache.commands import _argtypes as argtypes

HELP = "replay a trace against a running server; TTFT/ITL/throughput/cache hits as a table and JSON"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--trace", default="synthetic", help="JSONL file, or synthetic[:tenants=4,...]")
    parser.add_argument("--rate", type=float, default=float("inf"), help="requests per second (Poisson)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds to keep sending")
    parser.add_argument(
        "--num-prompts",
        type=argtypes.positive_int,
        help="stop sending after this many requests (default: keep sending until --duration)",
    )
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--block-tokens", type=int, default=512, help="tokens per Mooncake hash id")
    parser.add_argument("--vocab-size", type=int, default=256, help="token ids are drawn below this")
    parser.add_argument("--config", help="server config: tenant names in the trace use their first key")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-file", help="write the JSON summary here too")
    parser.add_argument(
        "--api-key",
        help="key for requests whose tenant --config does not map (default: "
        "$KVCACHE_API_KEY, else $OPENAI_API_KEY; prefer the variable, argv is visible to "
        "other users)",
    )
    parser.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 even when some requests failed (default: exit 1)",
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvcache.lab import serve_bench as bench
    from kvcache.serve.config import ServeConfig

    trace = bench.load_trace(args.trace, block_tokens=args.block_tokens, vocab_size=args.vocab_size)
    config = ServeConfig.load(args.config)
    keys: dict[str, str] = {}
    for key, tenant in sorted(config.keys.items()):
        keys.setdefault(tenant, key)
    api_key = args.api_key or os.environ.get("KVCACHE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    with tqdm(desc="requests", unit="req", leave=False, disable=None) as progress:
        results, wall_s = asyncio.run(
            bench.run_load(
                args.url,
                trace,
                rate=args.rate,
                duration_s=args.duration,
                max_concurrency=args.max_concurrency,
                keys=keys,
                seed=args.seed,
                progress=progress,
                api_key=api_key,
                num_prompts=args.num_prompts,
            )
        )
    offered = bench.offered(args.rate, args.duration, args.seed, args.num_prompts)
    summary = bench.summarize(
        results, wall_s, rate=args.rate, max_concurrency=args.max_concurrency, offered=offered
    )
    print(bench.table(summary))
    text = json.dumps(summary, indent=2)
    print(text)
    if args.result_file:
        Path(args.result_file).write_text(text + "\n")
    if summary["failed"] and not args.allow_failures:
        print(
            f"kvcache bench-serve: {summary['failed']} of {len(results)} requests failed (see above); "
            "--allow-failures to exit 0 anyway",
            file=sys.stderr,
        )
        return 1
    return 0 if summary["completed"] else 1
