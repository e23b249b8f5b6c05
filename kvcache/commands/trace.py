"""``kvcache trace``: generate a seeded synthetic trace in Mooncake or token-level JSONL."""

from __future__ import annotations

import argparse

from kvcache.commands import _argtypes as argtypes

HELP = "generate a seeded synthetic request trace (chat, agents, documents, RAG, bursts, shared prefix)"


def add_parser(parser: argparse.ArgumentParser) -> None:
    from kvcache.lab.workloads import SHAPES, WORKLOADS

    parser.add_argument("output", type=argtypes.output_path, help="JSONL file to write")
    parser.add_argument(
        "--workload",
        choices=(*WORKLOADS, *SHAPES),
        default="mix",
        help="token-level workloads (mix, chat, agent, docs, shared_prefix) or the benchmark shapes "
        "(rag, bursty, long_agent, fleet; Mooncake format only); see docs/router.md",
    )
    parser.add_argument("--format", choices=("mooncake", "tokens"), default="mooncake")
    parser.add_argument("--requests", type=argtypes.positive_int, default=1000)
    parser.add_argument(
        "--tenants", type=argtypes.positive_int, default=None, help="tenants (default 4; rag: 40)"
    )
    parser.add_argument(
        "--session-rate", type=argtypes.positive_float, default=1.0, help="new sessions per second"
    )
    parser.add_argument(
        "--block-tokens", type=argtypes.positive_int, default=512, help="tokens per hash id (Mooncake format)"
    )
    parser.add_argument(
        "--load",
        type=argtypes.positive_float,
        default=None,
        help="benchmark shapes: rescale the clock so the trace offers this prefill load to --workers",
    )
    parser.add_argument(
        "--workers", type=argtypes.positive_int, default=16, help="workers the --load refers to"
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from kvcache.errors import ConfigError
    from kvcache.lab.trace import scale_to_load, to_block_ids, write_trace
    from kvcache.lab.workloads import SHAPES, ShapeConfig, SynthConfig, synthesize, synthesize_shape

    if args.workload in SHAPES:
        if args.format != "mooncake":
            raise ConfigError(f"--workload {args.workload} is written in Mooncake format only; drop --format")
        requests = synthesize_shape(
            ShapeConfig(args.workload, args.requests, args.block_tokens, args.tenants or 40, seed=args.seed)
        )
        if args.load is not None:
            requests = scale_to_load(requests, args.workers, args.load)
    else:
        if args.load is not None:
            raise ConfigError("--load applies to the benchmark shapes (rag, bursty, long_agent, fleet)")
        requests = synthesize(
            SynthConfig(
                workload=args.workload,
                num_requests=args.requests,
                num_tenants=args.tenants or 4,
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
