"""``kvcache worker``: one engine process that joins a deployment through Redis.

It needs the deployment's secret (``KVCACHE_SECRET`` as hex, or ``KVCACHE_SECRET_FILE`` naming an
owner-only file) and its Redis (``--connect`` without credentials, or ``KVCACHE_REDIS_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from typing import Any

from kvcache.commands import _argtypes as argtypes
from kvcache.commands._engine_flags import add_engine_flags
from kvcache.model.registry import DEFAULT_MODEL

HELP = "run one engine worker that registers in Redis and serves the front over HTTP"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connect",
        help="the deployment's Redis, redis://host:port/db (no password: a URL "
        "with credentials goes in KVCACHE_REDIS_URL, the default)",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--worker-id", help="stable name (default host-pid); reuse it to rejoin")
    parser.add_argument("--host", default="127.0.0.1", help="bind address")
    parser.add_argument("--port", type=argtypes.port, default=0, help="0 = any free port")
    parser.add_argument("--advertise", help="host the front should connect to (default: --host)")
    parser.add_argument("--config", help="the server config, for tenant quotas and k-anonymity")
    add_engine_flags(parser, of_workers=False)
    parser.add_argument("--seed", type=int, default=0, help="weights of random models (same on every worker)")
    parser.add_argument(
        "--vllm-events",
        metavar="PUB[,REPLAY]",
        help="also publish vLLM's KV event stream on these ZMQ endpoints (a bare port is on 127.0.0.1, "
        "e.g. 5557,5558), keys as vLLM's sha256_cbor with PYTHONHASHSEED 0 salted by the tenant's "
        "keyed pseudonym (a published public prefix: by the public scope's, the same for every tenant, "
        "as `kvcache route --engine-api kvcache` keys it); another host needs --vllm-events-curve",
    )
    parser.add_argument(
        "--vllm-events-curve",
        metavar="CERT,CLIENTS",
        help="secure the event sockets with ZeroMQ CURVE: this publisher's secret certificate file "
        "(owner-only) and a folder of the public certificates (NAME.key) of the subscribers allowed",
    )
    parser.add_argument(
        "--vllm-events-token-ids",
        action="store_true",
        help="put the prompt's token ids in BlockStored events (default: empty)",
    )


def _vllm_event_publisher(args: argparse.Namespace) -> Any:
    """The ``EventPublisher`` of ``--vllm-events``, bound; None without the flag."""
    if not args.vllm_events:
        return None
    from kvcache.vllm.curve import CurveServer, local_endpoint
    from kvcache.vllm.events import EventPublisher

    pub, _, replay = args.vllm_events.partition(",")
    curve = None
    if args.vllm_events_curve:
        cert, _, clients = args.vllm_events_curve.partition(",")
        curve = CurveServer.load(cert, clients)
    return EventPublisher(local_endpoint(pub), local_endpoint(replay) if replay else None, curve=curve)


def run(args: argparse.Namespace) -> int:
    from kvcache.errors import ConfigError
    from kvcache.serve import auth, engine_setup
    from kvcache.serve.config import ServeConfig
    from kvcache.serve.launch import check_redis
    from kvcache.serve.worker import Worker, serve_forever

    secret = auth.load_secret(os.environ)
    if secret is None:
        raise ConfigError(
            f"a worker needs its deployment's secret: set {auth.SECRET_ENV} (hex) or "
            f"{auth.SECRET_FILE_ENV} (a file only you can read), as `kvcache serve` does"
        )
    redis_url = auth.redis_url(args.connect, os.environ)
    if redis_url is None:
        raise ConfigError(f"a worker needs its deployment's Redis: --connect URL or {auth.REDIS_URL_ENV}")
    auth.refuse_open_redis(redis_url)
    keys = auth.DeploymentKeys.from_secret(secret)
    config = ServeConfig.load(args.config)
    publisher = _vllm_event_publisher(args)  # before the engine loads: a bad endpoint or key fails fast
    check_redis(redis_url)  # a worker that cannot reach its deployment exits, it does not wait
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    engine, tier_names = engine_setup.load_engine(
        args.model,
        config,
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        threads=args.threads,
        seed=args.seed,
        redis_url=None if args.no_pod_tier else redis_url,
        worker_id=worker_id,
        deployment_key=keys.block_key,
        tier_secret=keys.tier_key,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=args.max_num_seqs,
    )
    worker = Worker(engine, worker_id, redis_url, keys, tier_names, max_waiting=args.max_waiting)
    if publisher is not None:
        from kvcache.vllm.events import EngineEventBridge
        from kvcache.vllm.keys import VllmKeyer
        from kvcache.vllm.public import public_salt

        keyer = VllmKeyer(args.block_size, "sha256_cbor", "0", public_salt=public_salt(keys))
        worker.vllm_events = EngineEventBridge(
            publisher, keyer, engine.manager, keys.pseudonym, token_ids=args.vllm_events_token_ids
        )
    asyncio.run(serve_forever(worker, args.host, args.port, args.advertise))
    if worker.refused is not None:
        raise ConfigError(f"the front refused worker {worker_id}: {worker.refused}")
    return 0
