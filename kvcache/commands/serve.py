"""``kvcache serve``: an OpenAI-compatible server over N worker processes sharing Redis."""

from __future__ import annotations

import argparse
import asyncio

from kvcache import argtypes

HELP = "serve a model over HTTP (OpenAI API) with prefix-affinity routing over N worker processes"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="HF name or path, or tiny, tiny-llama, ...")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--redis", help="use this Redis (redis://host:port/db) instead of starting one")
    parser.add_argument("--config", help="tenants and API keys (.toml or .json); none = keyless loopback")
    parser.add_argument("--host", help="bind address (default: the config's host, else 127.0.0.1)")
    parser.add_argument("--port", type=argtypes.port, default=8000)
    parser.add_argument(
        "--policy",
        default="ttft",
        help="ttft (default: lowest estimated TTFT on workers that serve one request at a time), or a "
        "router policy: affinity, round_robin, ...",
    )
    parser.add_argument("--mode", default="precise", choices=["precise", "approx"])
    parser.add_argument("--num-blocks", type=int, default=1024, help="device pool blocks per worker")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--no-pod-tier", action="store_true", help="workers do not share blocks via Redis")


def run(args: argparse.Namespace) -> int:
    from kvcache.errors import ConfigError
    from kvcache.redis_server import start_redis
    from kvcache.serve import launch, tokenize
    from kvcache.serve.config import ServeConfig

    if args.workers < 1:
        raise ConfigError(f"--workers={args.workers} must be >= 1")
    config = ServeConfig.load(args.config)
    argtypes.check_port_free(args.host or config.host, args.port)
    redis = None if args.redis else start_redis()
    redis_url = args.redis or redis.url  # type: ignore[union-attr]
    worker_args = launch.WorkerArgs(model=args.model, num_blocks=args.num_blocks, block_size=args.block_size,
                                    threads=args.threads, config_path=args.config,
                                    pod_tier=not args.no_pod_tier)  # fmt: skip
    workers = launch.spawn_workers(worker_args, redis_url, args.workers)
    try:
        front = launch.make_front(config=config, model=args.model, tokenizer=tokenize.load(args.model),
                                  redis_url=redis_url, policy=args.policy, mode=args.mode,
                                  block_size=args.block_size)  # fmt: skip
        asyncio.run(launch.run_front(front, args.host or config.host, args.port))
    finally:
        launch.stop_processes(workers)
        if redis is not None:
            redis.stop()
    return 0
