"""Published (public) prefixes on vLLM's side: a kvcache worker's event bridge publishes a prompt's
public head under the public scope's vLLM keys, the same whichever tenant stored it, and the rest
under the tenant's; ``kvcache route --engine-api kvcache`` follows the deployment's signed set in
Redis and keys requests exactly so. Every sharing check has its isolation control: what follows
the public head is never another tenant's."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from deployment import KEYS
from serve_harness import free_port

from kvcache import BlockManager, CacheConfig
from kvcache.cache.tenancy import Scope
from kvcache.errors import ConfigError, ScopeError
from kvcache.model.tokenize import ByteTokenizer
from kvcache.redis_server import start_redis
from kvcache.serve import peer, wire
from kvcache.serve.auth import DeploymentKeys, new_secret
from kvcache.serve.config import PublicPrefixSpec
from kvcache.serve.public import PublicPrefixes, render
from kvcache.vllm.events import BlockRemoved, BlockStored, EngineEventBridge, EventPublisher, index_key
from kvcache.vllm.keys import VllmKeyer
from kvcache.vllm.proxy import EngineEndpoint, RouteProxy
from kvcache.vllm.public import PublicHead, public_salt

BLOCK = 16
SYSTEM = [(5 * i) % 200 + 11 for i in range(40)]  # the published prefix: 2 full blocks and 8 tokens
PUBLIC_SALT = public_salt(KEYS)
KEYER = VllmKeyer(BLOCK, "sha256_cbor", "0", public_salt=PUBLIC_SALT)
PUBLIC_KEYS = VllmKeyer(BLOCK).keys(SYSTEM[:32], cache_salt=PUBLIC_SALT)  # the head: a prompt of its own


def held(proxy: RouteProxy, engine: int, keys: list[int]) -> int:
    """Leading vLLM ``keys`` the router's index holds for the proxy's engine ``engine``."""
    return proxy.index.overlap(engine, [index_key(k) for k in keys])


def tail(seed: int, n: int) -> list[int]:
    return [(seed * 31 + 7 * i) % 240 + 300 for i in range(n)]


def salt(tenant: str) -> str:
    """The salt a kvcache worker keys ``tenant``'s blocks with (its scope's keyed pseudonym)."""
    return KEYS.pseudonym(Scope(tenant).chain_scope)


# ---- the keys --------------------------------------------------------------------------------


def test_without_a_public_head_the_keys_are_vllms() -> None:
    vllm = VllmKeyer(BLOCK, "sha256_cbor", "0")
    prompt = SYSTEM + tail(1, 40)
    for lora, cache_salt in ((None, None), (None, "s"), ("lora-a", "s"), ("lora-a", None)):
        want = vllm.block_hashes(prompt, lora, cache_salt)
        assert KEYER.block_hashes(prompt, lora, cache_salt) == want
        assert KEYER.block_hashes(prompt, lora, cache_salt, public_blocks=0) == want


def test_the_public_head_is_a_prompt_of_its_own_and_the_tenants_salt_follows_it() -> None:
    prompt = SYSTEM + tail(1, 40)  # 5 full blocks
    blocks = [tuple(prompt[i * BLOCK : (i + 1) * BLOCK]) for i in range(5)]
    h = KEYER.hash
    for lora in (None, "lora-a"):
        extra = (lora,) if lora else ()
        k0 = h((KEYER.none_hash, blocks[0], (*extra, PUBLIC_SALT)))
        k1 = h((k0, blocks[1], extra or None))
        k2 = h((k1, blocks[2], (*extra, "salt-a")))  # the tenant's salt, chained on from the head
        k3 = h((k2, blocks[3], extra or None))
        k4 = h((k3, blocks[4], extra or None))
        assert KEYER.block_hashes(prompt, lora, "salt-a", public_blocks=2) == [k0, k1, k2, k3, k4]
    head = KEYER.keys(prompt, cache_salt="salt-a", public_blocks=2)[:2]
    assert head == KEYER.keys(prompt, cache_salt="salt-b", public_blocks=2)[:2] == PUBLIC_KEYS
    assert set(KEYER.keys(prompt, cache_salt="salt-a", public_blocks=2)[2:]).isdisjoint(
        KEYER.keys(prompt, cache_salt="salt-b", public_blocks=2)
    )
    # The whole prompt public: no block carries a tenant's salt.
    assert KEYER.keys(SYSTEM[:32], cache_salt="salt-a", public_blocks=2) == PUBLIC_KEYS


def test_a_public_head_needs_both_salts_and_no_tenant_has_the_public_one() -> None:
    prompt = SYSTEM + tail(1, 40)
    with pytest.raises(ConfigError, match="public_salt"):
        VllmKeyer(BLOCK).keys(prompt, cache_salt="s", public_blocks=1)
    with pytest.raises(ScopeError, match="needs the request's cache_salt"):
        KEYER.keys(prompt, public_blocks=1)
    with pytest.raises(ScopeError, match="public scope's salt"):
        KEYER.keys(prompt, cache_salt=PUBLIC_SALT)
    with pytest.raises(ConfigError, match=r"public_blocks=6 must be in 0\.\.5"):
        KEYER.keys(prompt, cache_salt="s", public_blocks=6)
    for bad in (-1, True, 1.0):
        with pytest.raises(ConfigError, match="public_blocks="):
            KEYER.keys(prompt, cache_salt="s", public_blocks=bad)
    with pytest.raises(ConfigError, match="public_salt=''"):
        VllmKeyer(BLOCK, public_salt="")
    # A tenant's salt is the pseudonym of its own chain scope, which is never "public".
    for scope in (
        Scope("public"),
        Scope("a", salt="public"),
        Scope("a", group="public"),
        Scope("public", salt="x"),
    ):
        assert KEYS.pseudonym(scope.chain_scope) != PUBLIC_SALT
    assert DeploymentKeys.from_secret(new_secret()).pseudonym("public") != PUBLIC_SALT  # per deployment


# ---- the worker's event bridge ---------------------------------------------------------------


class Captured:
    """Stands in for ``EventPublisher``: keeps each published batch."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def publish(self, events: list[Any], *, send: bool = True) -> int:
        self.batches.append(events)
        return len(self.batches) - 1


class Worker:
    """A worker's block manager with the deployment's public prefix and its vLLM event bridge."""

    def __init__(self, num_blocks: int = 32) -> None:
        config = CacheConfig(num_blocks=num_blocks, block_size=BLOCK, deployment_key=KEYS.block_key)
        self.manager = BlockManager(config)
        self.manager.set_published([SYSTEM])
        self.publisher = Captured()
        self.bridge = EngineEventBridge(self.publisher, KEYER, self.manager, KEYS.pseudonym)

    def serve(self, request_id: str, prompt: list[int], tenant: str) -> list[Any]:
        """Cache ``prompt`` for ``tenant``; the events the bridge published for it."""
        before = len(self.publisher.batches)
        self.manager.allocate(request_id, prompt, Scope(tenant))
        self.bridge.publish_engine_events(prompt, Scope(tenant), self.manager.drain_events())
        return [event for batch in self.publisher.batches[before:] for event in batch]


def stored(events: list[Any]) -> tuple[list[int | bytes], int | bytes | None]:
    [event] = [e for e in events if isinstance(e, BlockStored)]
    return event.block_hashes, event.parent_block_hash


def test_two_tenants_publish_the_same_keys_for_the_public_blocks_and_their_own_after_them() -> None:
    prompt_a, prompt_b = SYSTEM + tail(1, 40), SYSTEM + tail(2, 40)  # 5 full blocks each, 2 public
    keys_a = KEYER.keys(prompt_a, cache_salt=salt("acme"), public_blocks=2)
    keys_b = KEYER.keys(prompt_b, cache_salt=salt("globex"), public_blocks=2)
    assert keys_a[:2] == keys_b[:2] == PUBLIC_KEYS and set(keys_a[2:]).isdisjoint(keys_b[2:])
    # Worker 1 stores the public blocks for acme, worker 2 for globex: the same keys either way.
    first, second = Worker(), Worker()
    assert stored(first.serve("a", prompt_a, "acme")) == (keys_a, None)
    assert stored(first.serve("b", prompt_b, "globex")) == (keys_b[2:], PUBLIC_KEYS[-1])
    assert stored(second.serve("b", prompt_b, "globex")) == (keys_b, None)
    assert stored(second.serve("a", prompt_a, "acme")) == (keys_a[2:], PUBLIC_KEYS[-1])
    # Isolation control: globex sending acme's very prompt shares the public head only.
    keys_ga = KEYER.keys(prompt_a, cache_salt=salt("globex"), public_blocks=2)
    assert stored(first.serve("ga", prompt_a, "globex")) == (keys_ga[2:], PUBLIC_KEYS[-1])
    assert set(keys_ga[2:]).isdisjoint(keys_a)
    # Positive control: acme's own repeat stores nothing new (it is all cached, under those keys).
    assert first.serve("a2", prompt_a, "acme") == []


def test_a_prompt_that_leaves_the_public_text_inside_a_block_keeps_that_block_private() -> None:
    worker = Worker()
    inside_second = SYSTEM[:24] + tail(3, 40)  # block 0 public; block 1 is 8 public tokens and 8 others
    assert worker.manager.hash(inside_second, Scope("acme")).num_public_blocks == 1
    keys = KEYER.keys(inside_second, cache_salt=salt("acme"), public_blocks=1)
    assert keys[0] == PUBLIC_KEYS[0]
    assert stored(worker.serve("a", inside_second, "acme")) == (keys, None)
    keys_g = KEYER.keys(inside_second, cache_salt=salt("globex"), public_blocks=1)
    assert stored(worker.serve("g", inside_second, "globex")) == (keys_g[1:], PUBLIC_KEYS[0])
    assert set(keys_g[1:]).isdisjoint(keys)
    # Leaving it inside block 0: nothing is public, every key is vLLM's salted key of the tenant.
    inside_first = SYSTEM[:8] + tail(4, 40)
    private = VllmKeyer(BLOCK).keys(inside_first, cache_salt=salt("acme"))
    assert stored(worker.serve("a3", inside_first, "acme")) == (private, None)
    assert PUBLIC_KEYS[0] not in private


def test_a_public_block_is_removed_under_the_key_it_was_published_with() -> None:
    worker = Worker(num_blocks=5)
    prompt_a = SYSTEM + tail(1, 40)
    keys_a = KEYER.keys(prompt_a, cache_salt=salt("acme"), public_blocks=2)
    worker.serve("a", prompt_a, "acme")
    worker.manager.free("a")
    worker.manager.set_published([])  # withdrawn: the blocks stay cached under their public keys
    other = tail(5, 80)
    events = worker.serve("c", other, "initech")  # needs all 5 blocks: every one of acme's is evicted
    assert events[0] == BlockRemoved(keys_a[::-1], "GPU")  # tail first
    assert stored(events) == (KEYER.keys(other, cache_salt=salt("initech")), None)


def test_a_bridge_needs_the_deployments_public_salt() -> None:
    manager = BlockManager(CacheConfig(num_blocks=8, block_size=BLOCK, deployment_key=KEYS.block_key))
    other = DeploymentKeys.from_secret(new_secret())
    for keyer in (VllmKeyer(BLOCK), VllmKeyer(BLOCK, public_salt=public_salt(other))):
        with pytest.raises(ConfigError, match="not this deployment's public scope salt"):
            EngineEventBridge(Captured(), keyer, manager, KEYS.pseudonym)


# ---- the proxy -------------------------------------------------------------------------------


def proxy_for(engines: list[EngineEndpoint], public: PublicHead) -> RouteProxy:
    return RouteProxy(
        engines,
        KEYER,
        capacity_blocks=64,
        api="kvcache",
        connect_worker=peer.opener(KEYS, aiohttp.ClientTimeout(total=60)),
        cache_salt_of=lambda scope: KEYS.pseudonym(scope.chain_scope),
        public=public,
    )


async def joined(proxy: RouteProxy, publishers: list[EventPublisher]) -> None:
    """PUB/SUB joins asynchronously: publish empty batches until every subscriber has one."""
    deadline = time.monotonic() + 10
    while any(sub.next_seq is None for sub in proxy.subscribers):
        for publisher in publishers:
            publisher.publish([])
        await asyncio.sleep(0.05)
        proxy.poll_events()
        assert time.monotonic() < deadline


async def indexed(proxy: RouteProxy, engine: int, keys: list[int]) -> None:
    deadline = time.monotonic() + 10
    while held(proxy, engine, keys) < len(keys):
        await asyncio.sleep(0.02)
        assert time.monotonic() < deadline, "the engine's events did not arrive"


def test_the_proxy_keys_requests_as_the_bridge_published_them(caplog: pytest.LogCaptureFixture) -> None:
    """Engine 1 cached acme's prompt (public head and acme's continuation); every other tenant's
    first request sharing the public prefix goes there and matches the head, never acme's rest."""

    async def scenario() -> None:
        endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
        publishers = [EventPublisher(endpoint) for endpoint in endpoints]
        engines = [EngineEndpoint(f"http://127.0.0.1:{free_port()}", e) for e in endpoints]  # not called
        head = PublicHead(BLOCK, KEYS, None)  # no Redis: the set is given here (Redis: the next test)
        proxy = proxy_for(engines, head)
        client = TestClient(TestServer(proxy.app()))
        await client.start_server()
        try:
            await joined(proxy, publishers)
            worker = Worker()
            worker.bridge.publisher = publishers[1]
            prompt_a = SYSTEM + tail(1, 40)
            worker.serve("a", prompt_a, "acme")
            keys_a = KEYER.keys(prompt_a, cache_salt=salt("acme"), public_blocks=2)
            await indexed(proxy, 1, keys_a)
            # Before the proxy knows the set it keys acme's prompt privately: no match anywhere.
            private_a = proxy.block_keys({"prompt": prompt_a}, Scope("acme"))
            assert private_a == KEYER.keys(prompt_a, cache_salt=salt("acme"))
            assert held(proxy, 1, private_a) == 0
            head.set(1, [SYSTEM])
            assert proxy.block_keys({"prompt": prompt_a}, Scope("acme")) == keys_a  # as published
            assert held(proxy, 1, keys_a) == 5  # positive control: acme's own repeat
            for n, tenant in enumerate(["globex", "initech", "hooli", "umbrella", "wonka", "stark"]):
                await asyncio.sleep(0.1)  # past the prefill the router models for the one before
                body = {"prompt": SYSTEM + tail(10 + n, 40)}
                keys = proxy.block_keys(body, Scope(tenant))
                assert keys[:2] == PUBLIC_KEYS and held(proxy, 1, keys) == 2
                assert held(proxy, 0, keys) == 0
                request_id, engine = proxy.place(body, Scope(tenant))
                proxy.router.on_finished(request_id)
                assert engine == 1, tenant  # where the public blocks are
            # Negative control: globex sending acme's very prompt matches the public head only.
            keys_ga = proxy.block_keys({"prompt": prompt_a}, Scope("globex"))
            assert held(proxy, 1, keys_ga) == 2 and set(keys_ga[2:]).isdisjoint(keys_a)
            # A salt narrows globex's own scope: the head stays public, the rest is the sub-scope's.
            salted = proxy.block_keys({"prompt": prompt_a}, Scope("globex", salt="s"))
            assert salted[:2] == PUBLIC_KEYS and set(salted[2:]).isdisjoint(keys_ga + keys_a)
        finally:
            await client.close()
            for publisher in publishers:
                publisher.close()

    with caplog.at_level(logging.WARNING, logger="kvcache.route"):
        asyncio.run(asyncio.wait_for(scenario(), 60))
    # Without Redis the proxy says once that it keys privately (the set above was given directly).
    said = [r.getMessage() for r in caplog.records if r.name == "kvcache.route"]
    assert len(said) == 1 and "every block is keyed in the caller's scope" in said[0]


def test_public_prefixes_are_for_kvcache_workers_only() -> None:
    engine = EngineEndpoint("http://127.0.0.1:1", f"tcp://127.0.0.1:{free_port()}")
    head = PublicHead(BLOCK, KEYS, None)
    with pytest.raises(ConfigError, match="kvcache workers only"):
        RouteProxy([engine], KEYER, capacity_blocks=64, public=head)
    with pytest.raises(ConfigError, match="need a keyer with public_salt"):
        RouteProxy(
            [engine],
            VllmKeyer(BLOCK),
            capacity_blocks=64,
            api="kvcache",
            connect_worker=peer.opener(KEYS, aiohttp.ClientTimeout(total=60)),
            public=head,
        )
    with pytest.raises(ConfigError, match="blocks of 8 tokens"):
        proxy_for([engine], PublicHead(8, KEYS, None))


def test_route_refuses_connect_for_vllm_engines(capsys: pytest.CaptureFixture[str]) -> None:
    from kvcache.cli import main

    engine = f"http://127.0.0.1:{free_port()},tcp://127.0.0.1:{free_port()}"
    argv = ["route", "--engine", engine, "--capacity-blocks", "8", "--port", str(free_port())]
    assert main([*argv, "--connect", "redis://127.0.0.1:1/0"]) == 2
    assert "public prefixes do not apply to them" in capsys.readouterr().err


def signed_set(keys: DeploymentKeys, *prefixes: list[int]) -> PublicPrefixes:
    public = PublicPrefixes(keys)
    for tokens in prefixes:
        public.add(render(PublicPrefixSpec("token_ids", tuple(tokens)), ByteTokenizer()))
    return public


def test_the_proxy_follows_the_signed_set_in_redis_and_ignores_a_forged_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import redis.asyncio as aioredis

    prompt = SYSTEM + tail(1, 40)
    genuine = signed_set(KEYS, SYSTEM)
    other_deployment = signed_set(DeploymentKeys.from_secret(new_secret()), SYSTEM).signed()
    altered = json.loads(signed_set(KEYS, SYSTEM[:16]).signed())
    altered["notice"] = altered["notice"].replace(f"[{SYSTEM[0]}, ", f"[{SYSTEM[0]}, {SYSTEM[1]}, ", 1)
    unsigned = json.dumps({"kind": "public-prefixes", "version": 2**62, "prefixes": [SYSTEM]})
    forged = [other_deployment, json.dumps(altered), unsigned]

    async def scenario(redis_url: str) -> None:
        client: Any = aioredis.Redis.from_url(redis_url)
        head = PublicHead(BLOCK, KEYS, redis_url)
        try:
            for raw in forged:
                await client.set(wire.PUBLIC_KEY, raw)
                assert await head.refresh(client) is False
                assert await head.refresh(client) is False  # the same value: no second error line
                assert head.version == 0 and head.num_public_blocks(prompt) == 0
            older = genuine.signed()
            genuine.add(render(PublicPrefixSpec("token_ids", (1, 2, 3)), ByteTokenizer()))
            await client.set(wire.PUBLIC_KEY, genuine.signed())
            assert await head.refresh(client) is True
            assert head.version == genuine.version and head.num_public_blocks(prompt) == 2
            for raw in (older, *forged):  # a replayed older set, then forgeries: the set stays
                await client.set(wire.PUBLIC_KEY, raw)
                assert await head.refresh(client) is False
                assert head.version == genuine.version and head.num_public_blocks(prompt) == 2
            # The proxy's own timer reads it too, from the start of its app.
            engine = EngineEndpoint("http://127.0.0.1:1", f"tcp://127.0.0.1:{free_port()}")
            proxy = proxy_for([engine], PublicHead(BLOCK, KEYS, redis_url, period_s=0.05))
            await client.set(wire.PUBLIC_KEY, genuine.signed())
            server = TestClient(TestServer(proxy.app()))
            await server.start_server()
            try:
                deadline = time.monotonic() + 10
                while proxy.public is not None and proxy.public.version != genuine.version:
                    await asyncio.sleep(0.02)
                    assert time.monotonic() < deadline, "the proxy did not read the set"
                keys = proxy.block_keys({"prompt": prompt}, Scope("acme"))
                assert keys == KEYER.keys(prompt, cache_salt=salt("acme"), public_blocks=2)
            finally:
                await server.close()
        finally:
            await client.aclose()

    with start_redis() as redis, caplog.at_level(logging.ERROR, logger="kvcache.public"):
        asyncio.run(asyncio.wait_for(scenario(redis.url), 60))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    # One line per forged value as it first appears, and again when it comes back after the genuine set.
    assert (
        errors == ["ignored public prefixes in Redis that do not verify (another deployment, or forged)"] * 6
    )
