"""``kvcache route``: an OpenAI-compatible proxy in front of vLLM engines, placing requests by
the engines' KV event streams."""

from __future__ import annotations

import argparse

HELP = "proxy OpenAI requests to vLLM engines, routed by what their KV event streams say they cache"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        action="append",
        required=True,
        metavar="URL,EVENTS[,REPLAY]",
        help="an engine's base URL, its KV event endpoint and optional replay endpoint (repeatable)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--block-size", type=int, default=16, help="the engines' --block-size")
    parser.add_argument("--hash", choices=("sha256_cbor", "xxhash_cbor"), default="sha256_cbor",
                        help="the engines' --prefix-caching-hash-algo")  # fmt: skip
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


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from kvcache.router.proxy import Engine, RouteProxy
    from kvcache.router.vllm_keys import VllmKeyer

    headers: dict[str, str] = {}
    connect_worker = None
    if args.engine_api == "kvcache":  # kvcache workers answer only their deployment's front (and us)
        import os

        from kvcache.errors import ConfigError
        from kvcache.serve import auth

        secret = auth.load_secret(os.environ)
        if secret is None:
            raise ConfigError(f"--engine-api kvcache needs the workers' deployment secret in "
                              f"{auth.SECRET_ENV} or {auth.SECRET_FILE_ENV}")  # fmt: skip
        import aiohttp

        from kvcache.serve import peer

        # Each call first makes the worker prove itself, then carries that instance's credential.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=60.0)
        connect_worker = peer.opener(auth.DeploymentKeys.from_secret(secret), timeout)
    engines = [Engine.parse(spec) for spec in args.engine]
    keyer = VllmKeyer(args.block_size, args.hash, args.seed)
    proxy = RouteProxy(engines, keyer, args.capacity_blocks, args.policy, frozenset(args.lora),
                       args.engine_api, headers, connect_worker)  # fmt: skip
    web.run_app(proxy.app(), host=args.host, port=args.port)
    return 0
