"""``kvcache route --engine-api kvcache`` in front of two real kvcache workers (the tiny model) with a
published prefix: the proxy reads the deployment's signed set from Redis, one worker applies it
from Redis as its heartbeats do and prefills it (its vLLM event stream then carries the public
blocks under the public keys), and every tenant's first request goes to that worker and hits the
public part, never another tenant's continuation (controls: the tenant's own repeat hits it)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from deployment import KEYS
from serve_harness import free_port

from kvcache.model.tokenize import ByteTokenizer
from kvcache.redis_server import start_redis
from kvcache.serve import peer, wire
from kvcache.serve.config import PublicPrefixSpec, ServeConfig
from kvcache.serve.public import PublicPrefixes, render
from kvcache.vllm.events import EngineEventBridge, EventPublisher, index_key
from kvcache.vllm.keys import VllmKeyer
from kvcache.vllm.proxy import EngineEndpoint, RouteProxy
from kvcache.vllm.public import PublicHead, public_salt

BLOCK = 16
SYSTEM = [(5 * i) % 200 + 11 for i in range(40)]  # 2 full blocks (32 tokens) and 8 more
KEYER = VllmKeyer(BLOCK, "xxhash_cbor", "7", public_salt=public_salt(KEYS))
PUBLIC_KEYS = VllmKeyer(BLOCK, "xxhash_cbor", "7").keys(SYSTEM[:32], cache_salt=public_salt(KEYS))
TENANTS = ("acme", "globex", "initech")
CONFIG = ServeConfig.from_dict({"tenants": {t: {"keys": [f"sk-{t}"]} for t in TENANTS}})


def held(proxy: RouteProxy, engine: int, keys: list[int]) -> int:
    """Leading vLLM ``keys`` the router's index holds for the proxy's engine ``engine``."""
    return proxy.index.overlap(engine, [index_key(k) for k in keys])


def tail(seed: int, n: int) -> list[int]:
    return [(seed * 31 + 7 * i) % 200 + 40 for i in range(n)]


async def wait_until(what: str, check: Any) -> None:
    deadline = time.monotonic() + 30  # a hang guard
    while not check():
        await asyncio.sleep(0.02)
        assert time.monotonic() < deadline, what


async def scenario(redis_url: str) -> dict[str, Any]:
    from kvcache.engine import EngineConfig
    from kvcache.serve.podtier import PodTieredEngine
    from kvcache.serve.worker import Worker

    redis: Any = aioredis.Redis.from_url(redis_url)
    public = PublicPrefixes(KEYS)  # the front's set, as it writes it to Redis
    public.add(render(PublicPrefixSpec("token_ids", tuple(SYSTEM)), ByteTokenizer()))
    await redis.set(wire.PUBLIC_KEY, public.signed())
    workers, runners, publishers, engines = [], [], [], []
    for name in ("cold", "warm"):
        engine = PodTieredEngine.load("tiny", EngineConfig(num_blocks=64, block_size=BLOCK, seed=0))
        worker = Worker(engine, name, None, KEYS)
        events = f"tcp://127.0.0.1:{free_port()}"
        publisher = EventPublisher(events)
        worker.vllm_events = EngineEventBridge(publisher, KEYER, engine.manager, KEYS.pseudonym)
        runners.append(await worker.start("127.0.0.1", 0))
        workers.append(worker)
        publishers.append(publisher)
        engines.append(EngineEndpoint(worker.url, events))
    cold, warm = workers
    proxy = RouteProxy(
        engines,
        KEYER,
        capacity_blocks=64,
        api="kvcache",
        config=CONFIG,
        connect_worker=peer.opener(KEYS, aiohttp.ClientTimeout(total=60)),
        cache_salt_of=lambda scope: KEYS.pseudonym(scope.chain_scope),
        public=PublicHead(BLOCK, KEYS, redis_url, period_s=0.05),
    )
    client = TestClient(TestServer(proxy.app()))
    await client.start_server()
    out: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 10
        while any(sub.next_seq is None for sub in proxy.subscribers):  # PUB/SUB joins asynchronously
            for p in publishers:
                p.publish([])
            await asyncio.sleep(0.05)
            proxy.poll_events()
            assert time.monotonic() < deadline
        # "cold" knows the set but holds none of it; "warm" applies it from Redis as its
        # heartbeats do (from the second on) and prefills it once.
        await cold.aengine.call(lambda: cold.engine.set_published([SYSTEM]))
        for _ in range(2):
            await warm.public.sync(redis)
        await wait_until("warm did not apply the set", lambda: warm.public.version == public.version)
        await wait_until("the proxy did not read the set", lambda: proxy.public.version == public.version)
        await wait_until("warm's public blocks", lambda: held(proxy, 1, PUBLIC_KEYS) == 2)
        out["cold_public"] = held(proxy, 0, PUBLIC_KEYS)

        async def ask(tenant: str, prompt: list[int]) -> tuple[str, int]:
            await asyncio.sleep(0.1)  # past the prefill the router models for the request before
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 1}
            headers = {"Authorization": f"Bearer sk-{tenant}"}
            resp = await client.post("/v1/completions", json=body, headers=headers)
            data = await resp.json()
            assert resp.status == 200, data
            return resp.headers["x-kvcache-engine"], data["usage"]["prompt_tokens_details"]["cached_tokens"]

        prompt_a = SYSTEM + tail(1, 30)  # 70 tokens: 4 full blocks, 2 of them public
        out["acme"] = await ask("acme", prompt_a)
        keys_a = KEYER.keys(prompt_a, cache_salt=KEYS.pseudonym("tenant:acme"), public_blocks=2)
        await wait_until("acme's blocks", lambda: held(proxy, 1, keys_a) == 4)
        out["globex"] = await ask("globex", SYSTEM + tail(2, 30))
        out["initech_sends_acmes_prompt"] = await ask("initech", prompt_a)
        out["acme_again"] = await ask("acme", prompt_a)
    finally:
        await client.close()
        for runner in runners:
            await runner.cleanup()
        for worker in workers:
            await worker.public.close()
            await worker.aengine.close()
        for p in publishers:
            p.close()
        await redis.aclose()
    return out


def test_every_tenants_first_request_goes_where_the_public_prefix_is(torch_one_thread: None) -> None:
    with start_redis() as redis:
        out = asyncio.run(asyncio.wait_for(scenario(redis.url), 120))
    assert out["cold_public"] == 0
    # Each tenant's first request: to the warm worker, the public part (2 blocks) cached.
    assert out["acme"] == ("1", 32) and out["globex"] == ("1", 32)
    # Another tenant sending acme's very prompt gets the public part, never acme's continuation ...
    assert out["initech_sends_acmes_prompt"] == ("1", 32)
    # ... which acme itself hits (positive control).
    assert out["acme_again"] == ("1", 64)
