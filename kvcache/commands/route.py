"""``kvcache route``: an OpenAI-compatible proxy in front of vLLM engines, placing requests by
the engines' KV event streams. Callers authenticate with the API keys of ``--config`` (the
format ``kvcache serve`` reads).

With ``--engine-api kvcache`` the engines are kvcache workers, and the proxy follows their
deployment's public prefixes from its Redis (``--connect URL`` or ``KVCACHE_REDIS_URL``, as a
worker does): a request's published head is keyed in the public scope, the same for every tenant,
as the workers publish it (``vllm.public``); without Redis every block is keyed privately. vLLM
engines (``--engine-api openai``) salt block 0 with the request's salt, so public prefixes do not
apply to them."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

from kvcache.cache.config import DEFAULT_BLOCK_SIZE
from kvcache.commands import _argtypes as argtypes

HELP = "proxy OpenAI requests to vLLM engines, routed by what their KV event streams say they cache"
EPILOG = (
    "Public prefixes: with --engine-api kvcache the proxy reads the deployment's published prefixes "
    "from its Redis (--connect or KVCACHE_REDIS_URL) and keys a request's published head in the "
    "public scope, as the workers' --vllm-events streams publish it, so every tenant's request is "
    "routed to the workers that hold it. vLLM engines (--engine-api openai) salt block 0 with the "
    "request's salt: public prefixes do not apply to them."
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument(
        "--engine",
        action="append",
        required=True,
        metavar="URL,EVENTS[,REPLAY]",
        help="an engine's base URL, its KV event endpoint and optional replay endpoint (repeatable)",
    )
    parser.add_argument(
        "--config",
        help="tenants and API keys (.toml or .json, as for `kvcache serve`); "
        "none = keyless: every caller is the tenant 'default'",
    )
    parser.add_argument("--host", help="bind address (default: the config's host, else 127.0.0.1)")
    parser.add_argument("--port", type=argtypes.port, default=8080)
    parser.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="the engines' --block-size"
    )
    parser.add_argument(
        "--hash",
        choices=("sha256_cbor", "xxhash_cbor"),
        default="sha256_cbor",
        help="the engines' --prefix-caching-hash-algo",
    )
    parser.add_argument("--seed", default="0", help="the engines' PYTHONHASHSEED")
    parser.add_argument("--capacity-blocks", type=int, required=True, help="KV blocks per engine")
    parser.add_argument("--policy", default="affinity")
    parser.add_argument("--lora", action="append", default=[], help="a model name that is a LoRA adapter")
    parser.add_argument(
        "--engine-api",
        choices=("openai", "kvcache"),
        default="openai",
        help="openai: vLLM engines; kvcache: kvcache workers started with --vllm-events",
    )
    parser.add_argument(
        "--connect",
        metavar="URL",
        help="with --engine-api kvcache: the deployment's Redis, redis://host:port/db, to follow its "
        "public prefixes (no password: a URL with credentials goes in KVCACHE_REDIS_URL, the default)",
    )
    parser.add_argument(
        "--events-curve",
        metavar="CERT,SERVER",
        help="subscribe with ZeroMQ CURVE: this proxy's secret certificate file (owner-only) and the "
        "engines' publisher public certificate file",
    )


def run(args: argparse.Namespace) -> int:
    from kvcache.serve.config import ServeConfig
    from kvcache.vllm.keys import VllmKeyer
    from kvcache.vllm.proxy import EngineEndpoint, RouteProxy

    config = ServeConfig.load(args.config)
    host = args.host or config.host
    argtypes.check_port_free(host, args.port)

    headers: dict[str, str] = {}
    from kvcache.cache.tenancy import Scope
    from kvcache.errors import ConfigError
    from kvcache.vllm.keys import scope_salt

    cache_salt_of: Callable[[Scope], str | None] = scope_salt  # vLLM engines: the scope's salt
    connect_worker = None
    public = None  # vLLM engines: no public head
    salt_of_public = None
    if args.engine_api != "kvcache" and args.connect:
        raise ConfigError(
            "--connect follows a kvcache deployment's public prefixes (--engine-api kvcache); vLLM "
            "engines salt block 0 with the request's salt, so public prefixes do not apply to them"
        )
    if args.engine_api == "kvcache":  # kvcache workers answer only their deployment's front (and us)
        import os

        from kvcache.serve import auth
        from kvcache.vllm.public import PublicHead, public_salt

        secret = auth.load_secret(os.environ)
        if secret is None:
            raise ConfigError(
                f"--engine-api kvcache needs the workers' deployment secret in "
                f"{auth.SECRET_ENV} or {auth.SECRET_FILE_ENV}"
            )
        import aiohttp

        from kvcache.serve import peer

        keys = auth.DeploymentKeys.from_secret(secret)
        # Each call first makes the worker prove itself, then carries that instance's credential.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=60.0)
        connect_worker = peer.opener(keys, timeout)

        def cache_salt_of(scope: Scope) -> str | None:  # kvcache workers: the scope's keyed pseudonym
            return keys.pseudonym(scope.chain_scope)

        redis_url = auth.redis_url(args.connect, os.environ)
        if redis_url is not None:
            auth.refuse_open_redis(redis_url)
        salt_of_public = public_salt(keys)
        public = PublicHead(args.block_size, keys, redis_url)

    curve = None
    if args.events_curve:
        from kvcache.vllm.curve import CurveClient

        cert, _, server = args.events_curve.partition(",")
        curve = CurveClient.load(cert, server)
    engines = [EngineEndpoint.parse(spec) for spec in args.engine]
    keyer = VllmKeyer(args.block_size, args.hash, args.seed, public_salt=salt_of_public)
    proxy = RouteProxy(
        engines,
        keyer,
        args.capacity_blocks,
        args.policy,
        frozenset(args.lora),
        args.engine_api,
        headers,
        config,
        events_curve=curve,
        cache_salt_of=cache_salt_of,
        connect_worker=connect_worker,
        public=public,
    )
    asyncio.run(_serve(proxy.runner(), host, args.port))
    return 0


async def _serve(runner: Any, host: str, port: int) -> None:
    """Serve ``runner`` (an aiohttp ``AppRunner``) on ``host:port`` until SIGINT or SIGTERM."""
    import signal

    from aiohttp import web

    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"kvcache route on http://{host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
