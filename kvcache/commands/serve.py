"""``kvcache serve``: an OpenAI-compatible server over N worker processes sharing Redis, or, with
``--workers 0``, one more front of a running deployment (``launch``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from kvcache.commands import _argtypes as argtypes
from kvcache.commands._engine_flags import add_engine_flags, given_flags
from kvcache.model.registry import DEFAULT_MODEL

HELP = "serve a model over HTTP (OpenAI API) with prefix-affinity routing over N worker processes"
# Flags of the workers this command starts: a front only (--workers 0) refuses them when given.
WORKER_FLAGS = ("threads", "dtype", "device", "no_pod_tier", "max_waiting")
# The Redis serve starts holds the pod tier's blocks (and the small, hot keys of registrations,
# heartbeats, events and the public set): bounded, least recently used first, so traffic can never
# grow it until the machine runs out of memory.
POD_TIER_MEMORY = "2gb"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"{DEFAULT_MODEL} (default), a local path, tiny, tiny-llama..."
    )
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="names clients send as 'model' (the first is reported; default: --model)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes to start (default 1); 0: front only: join the running deployment at "
        "--redis (or KVCACHE_REDIS_URL) with its secret (KVCACHE_SECRET or KVCACHE_SECRET_FILE), "
        "starting neither Redis nor workers; give it the deployment's --model, --block-size, "
        "--max-num-seqs, --num-blocks and --config",
    )
    parser.add_argument(
        "--redis",
        help="use this Redis (redis://host:port/db, no password: give a URL with "
        "credentials in KVCACHE_REDIS_URL) instead of starting one",
    )
    parser.add_argument(
        "--pod-tier-memory",
        type=argtypes.memory_size,
        default=POD_TIER_MEMORY,
        metavar="SIZE",
        help=f"memory of the Redis this command starts (default {POD_TIER_MEMORY}): the pod tier's blocks "
        "are evicted least recently used beyond it; with --redis, set maxmemory on that server instead",
    )
    parser.add_argument("--config", help="tenants and API keys (.toml or .json); none = keyless loopback")
    parser.add_argument("--host", help="bind address (default: the config's host, else 127.0.0.1)")
    parser.add_argument("--port", type=argtypes.port, default=8000)
    parser.add_argument(
        "--policy",
        default="affinity",
        help="router policy: affinity (default: lowest modelled TTFT, then the longest prefix), "
        "round_robin, least_loaded, sglang, ...",
    )
    parser.add_argument(
        "--latency",
        metavar="FILE",
        help="the workers' latency model (JSON from `kvcache calibrate` for this model and machine) that "
        "affinity prices workers with; default: LatencyModel's built-in figures",
    )
    parser.add_argument("--mode", default="precise", choices=["precise", "approx"])
    add_engine_flags(parser, of_workers=True)
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        help="longest prompt accepted (default: a worker's pool, num-blocks x block-size)",
    )
    parser.add_argument(
        "--header-timeout",
        type=argtypes.positive_float,
        default=10.0,
        metavar="S",
        help="seconds a client has to send a request's line and headers (from connecting, "
        "or from the last answer on a kept-alive connection) before it is closed",
    )
    parser.add_argument(
        "--body-timeout",
        type=argtypes.positive_float,
        default=60.0,
        metavar="S",
        help="seconds a client has to send a request's body (408 after)",
    )
    parser.add_argument(
        "--read-timeout",
        type=argtypes.positive_float,
        default=60.0,
        metavar="S",
        help="seconds a worker may stay silent on a request, its first token included, "
        "before the client gets a 504 (raise it where long prompts queue on slow workers)",
    )
    parser.add_argument(
        "--max-connections",
        type=argtypes.positive_int,
        metavar="N",
        help="open client connections (default 4096, or what the file-descriptor limit "
        "fits); past it the longest-idle connection is closed",
    )
    parser.add_argument(
        "--max-connections-per-client",
        type=argtypes.positive_int,
        metavar="N",
        help="open connections from one client address (default: a quarter of "
        "--max-connections; behind a proxy, raise it to --max-connections)",
    )


def run(args: argparse.Namespace) -> int:
    from kvcache.costs import LatencyModel
    from kvcache.errors import ConfigError
    from kvcache.model import tokenize
    from kvcache.redis_server import start_redis
    from kvcache.serve import auth, launch, limits
    from kvcache.serve.config import ServeConfig

    if args.workers < 0:
        raise ConfigError(f"--workers={args.workers} must be >= 0 (0: a front only, joining a deployment)")
    for flag, value in (
        ("--num-blocks", args.num_blocks),
        ("--block-size", args.block_size),
        ("--threads", args.threads),
    ):
        if value < 1:
            raise ConfigError(f"{flag}={value} must be >= 1")
    max_prompt_tokens = args.max_prompt_tokens or args.num_blocks * args.block_size
    if max_prompt_tokens < 1:
        raise ConfigError(f"--max-prompt-tokens={args.max_prompt_tokens} must be >= 1")
    secret = auth.load_secret(os.environ)  # KVCACHE_SECRET(_FILE)
    given = auth.redis_url(args.redis, os.environ)
    if given is not None and args.pod_tier_memory != POD_TIER_MEMORY:
        raise ConfigError(
            "--pod-tier-memory sizes the Redis serve starts, and --redis / KVCACHE_REDIS_URL names one that "
            "runs already: set maxmemory (with maxmemory-policy allkeys-lru) on that server instead"
        )
    if args.workers == 0:
        _check_front_only(args, given, secret)
    launch.check_policy(args.policy)
    latency = LatencyModel.from_json(args.latency) if args.latency else None
    config = ServeConfig.load(args.config)
    connection_limits = limits.ConnectionLimits(
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_connections=limits.fd_budget(args.max_connections),
        max_connections_per_client=args.max_connections_per_client,
    )
    # Before any worker starts: a registry model is converted once here, not by every worker at
    # once, and a model without tokenizer files fails here. The tokenizer itself is built once the
    # workers are started, while they load: building it imports transformers' model code (seconds),
    # which the workers do as well, so the two overlap instead of one waiting for the other.
    argtypes.check_port_free(args.host or config.host, args.port)
    tokenize.check(args.model)
    secret = secret or auth.new_secret()
    keys = auth.DeploymentKeys.from_secret(secret)
    if given is not None:
        auth.refuse_open_redis(given)
        launch.check_redis(given)
    # started from this (main) thread, which lives as long as serve: a serve killed with SIGKILL
    # takes its Redis with it, as its workers stop by themselves
    redis = None if given else start_redis(maxmemory=args.pod_tier_memory, stop_with_parent=True)
    if redis is not None and not redis.stops_with_parent:
        print(
            "kvcache serve: setpriv (util-linux) not found, so the Redis this command started would outlive "
            "a SIGKILL of it",
            file=sys.stderr,
        )
    redis_url = given or redis.url  # type: ignore[union-attr]
    workers: list[launch.WorkerProcess] = []
    try:
        worker_args = launch.WorkerArgs(
            model=args.model,
            num_blocks=args.num_blocks,
            block_size=args.block_size,
            threads=args.threads,
            config_path=args.config,
            pod_tier=not args.no_pod_tier,
            dtype=args.dtype,
            device=args.device,
            max_waiting=args.max_waiting,
            max_num_seqs=args.max_num_seqs,
        )
        workers = launch.spawn_workers(worker_args, redis_url, secret, args.workers)
        tokenizer = tokenize.load(args.model)
        front = launch.make_front(
            config=config,
            model=args.model,
            tokenizer=tokenizer,
            redis_url=redis_url,
            policy=args.policy,
            mode=args.mode,
            block_size=args.block_size,
            keys=keys,
            served_names=tuple(args.served_model_name or ()),
            max_prompt_tokens=max_prompt_tokens,
            latency=latency,
            max_num_seqs=args.max_num_seqs,
            limits=connection_limits,
            read_timeout_s=args.read_timeout,
        )
        asyncio.run(launch.run_front(front, args.host or config.host, args.port, workers))
    finally:
        launch.stop_processes([w.process for w in workers])
        if redis is not None:
            redis.stop()
    return 0


def _check_front_only(args: argparse.Namespace, redis_url: str | None, secret: bytes | None) -> None:
    """``ConfigError`` naming what a front only (``--workers 0``) lacks or cannot use."""
    from kvcache.errors import ConfigError
    from kvcache.serve import auth

    if redis_url is None:
        raise ConfigError(
            "--workers 0 starts a front only, which joins a running deployment: give that deployment's "
            f"Redis with --redis URL (or {auth.REDIS_URL_ENV}, where the URL holds a password)"
        )
    if secret is None:
        raise ConfigError(
            f"--workers 0 starts a front only: give it the deployment's secret in {auth.SECRET_ENV} or "
            f"{auth.SECRET_FILE_ENV}, as its workers have it (with another secret no worker would verify)"
        )
    given = given_flags(args, WORKER_FLAGS)
    if given:
        raise ConfigError(
            f"{', '.join(given)} configure the workers this command starts, and --workers 0 starts none: "
            "drop them (the deployment's workers keep their own)"
        )
