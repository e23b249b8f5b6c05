"""``kvcache trace``: generate a seeded synthetic trace in Mooncake or token-level JSONL."""

from __future__ import annotations

import argparse

from kvcache import argtypes

HELP = "generate a seeded synthetic request trace (chat, agent loops, Zipf documents, shared prefix)"


def add_parser(parser: argparse.ArgumentParser) -> None:
    from kvcache.router.synth import WORKLOADS

    parser.add_argument("output", type=argtypes.output_path, help="JSONL file to write")
    parser.add_argument("--workload", choices=WORKLOADS, default="mix")
    parser.add_argument("--format", choices=("mooncake", "tokens"), default="mooncake")
    parser.add_argument("--requests", type=argtypes.positive_int, default=1000)
    parser.add_argument("--tenants", type=argtypes.positive_int, default=4)
    parser.add_argument(
        "--session-rate", type=argtypes.positive_float, default=1.0, help="new sessions per second"
    )
    parser.add_argument(
        "--block-tokens", type=argtypes.positive_int, default=512, help="tokens per hash id (Mooncake format)"
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from kvcache.router.synth import SynthConfig, synthesize
    from kvcache.router.trace import to_block_ids, write_trace

    requests = synthesize(
        SynthConfig(
            workload=args.workload,
            num_requests=args.requests,
            num_tenants=args.tenants,
            session_rate_per_s=args.session_rate,
            seed=args.seed,
        )
    )
    if args.format == "mooncake":
        requests = to_block_ids(requests, args.block_tokens)
    n = write_trace(args.output, requests)
    tokens = sum(r.num_tokens for r in requests)
    print(
        f"wrote {n} {args.workload} requests ({tokens} prompt tokens, {args.format} format) to {args.output}"
    )
    return 0
