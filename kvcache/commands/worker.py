"""``kvcache worker --connect REDIS_URL``: one engine process that joins a deployment through Redis."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

from kvcache import argtypes

HELP = "run one engine worker that registers in Redis and serves the front over HTTP"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connect", required=True, help="the deployment's Redis, redis://host:port/db")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--worker-id", help="stable name (default host-pid); reuse it to rejoin")
    parser.add_argument("--host", default="127.0.0.1", help="bind address")
    parser.add_argument("--port", type=argtypes.port, default=0, help="0 = any free port")
    parser.add_argument("--advertise", help="host the front should connect to (default: --host)")
    parser.add_argument("--config", help="the server config, for tenant quotas and k-anonymity")
    parser.add_argument("--num-blocks", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="weights of random models (same on every worker)")
    parser.add_argument("--no-pod-tier", action="store_true", help="do not share blocks through Redis")


def run(args: argparse.Namespace) -> int:
    from kvcache.serve import engine_setup
    from kvcache.serve.config import ServeConfig
    from kvcache.serve.worker import Worker, serve_forever

    config = ServeConfig.load(args.config)
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    engine, tier_names = engine_setup.load_engine(
        args.model, config, num_blocks=args.num_blocks, block_size=args.block_size, threads=args.threads,
        seed=args.seed, redis_url=None if args.no_pod_tier else args.connect,
        worker_id=worker_id)  # fmt: skip
    worker = Worker(engine, worker_id, args.connect, tier_names)
    asyncio.run(serve_forever(worker, args.host, args.port, args.advertise))
    return 0
