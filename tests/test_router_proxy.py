"""``kvcache route`` end to end on loopback: the real proxy in front of two engines that answer
OpenAI completions and publish vLLM KV events (vLLM block keys, ZMQ PUB with a replay socket)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from deployment import KEYS

from kvcache import ConfigError
from kvcache.cache.tenancy import Scope
from kvcache.serve import peer
from kvcache.serve.config import ServeConfig
from kvcache.vllm.events import BlockStored, EventPublisher, index_key
from kvcache.vllm.keys import VllmKeyer
from kvcache.vllm.proxy import EngineEndpoint, RouteProxy
from kvcache.vllm.public import public_salt

BLOCK = 16


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StubEngine:
    """An engine that answers every completion and reports the prompt's full blocks as stored."""

    def __init__(self, name: str, keyer: VllmKeyer) -> None:
        self.name, self.keyer = name, keyer
        self.events, self.replay = f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"
        self.publisher = EventPublisher(self.events, self.replay)
        self.served: list[list[int]] = []
        self.salts: list[str | None] = []  # each request's cache_salt as the engine got it

    async def completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body["prompt"]
        self.salts.append(body.get("cache_salt"))
        if isinstance(prompt, list):
            self.served.append(prompt)
            keys = self.keyer.keys(prompt, cache_salt=body.get("cache_salt"))
            self.publisher.publish(
                [BlockStored(list(keys), None, prompt[: len(keys) * BLOCK], BLOCK, None, "GPU")]
            )
        return web.json_response(
            {"object": "text_completion", "engine": self.name, "choices": [{"text": "ok"}]}
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        return app


async def _scenario() -> dict[str, Any]:
    keyer = VllmKeyer(BLOCK, "sha256_cbor", "0")
    stubs = [StubEngine("a", keyer), StubEngine("b", keyer)]
    servers = [TestServer(s.app()) for s in stubs]
    for server in servers:
        await server.start_server()
    urls = [str(server.make_url("")).rstrip("/") for server in servers]
    engines = [EngineEndpoint(url, s.events, s.replay) for s, url in zip(stubs, urls, strict=True)]
    proxy = RouteProxy(engines, keyer, capacity_blocks=1000)
    client = TestClient(TestServer(proxy.app()))
    await client.start_server()
    out: dict[str, Any] = {}
    try:
        # PUB/SUB joins asynchronously: heartbeat until every subscriber has seen a message.
        deadline = time.monotonic() + 10
        while any(sub.next_seq is None for sub in proxy.subscribers):
            for s in stubs:
                s.publisher.publish([])
            await asyncio.sleep(0.05)
            proxy.poll_events()
            assert time.monotonic() < deadline

        async def ask(body: dict[str, Any]) -> tuple[int, str]:
            resp = await client.post("/v1/completions", json=body)
            data = await resp.json()
            return resp.status, data.get("engine", "") if resp.status == 200 else data["error"]["message"]

        async def indexed(engine: int, keys: list[int]) -> None:
            deadline = time.monotonic() + 10
            while proxy.index.overlap(engine, [index_key(k) for k in keys]) < len(keys):
                await asyncio.sleep(0.02)
                assert time.monotonic() < deadline

        prompt = list(range(100, 164))  # four full blocks
        status, first = await ask({"model": "m", "prompt": prompt, "max_tokens": 4})
        assert status == 200
        first_w = "ab".index(first)
        await indexed(first_w, keyer.keys(prompt))
        # the next turn extends the prompt: the engine that holds its first four blocks gets it
        # The next turns extend the prompt: the engine holding its first blocks gets each one.
        # Turns come 100 ms apart, past the modelled prefill the router charges for the last one.
        out["followups"] = []
        for k in (1, 2, 3, 4, 5):
            await asyncio.sleep(0.1)
            body = {"model": "m", "prompt": prompt + list(range(900, 900 + 16 * k)), "max_tokens": 4}
            out["followups"].append((await ask(body))[1])
        out["first"] = first
        # cache_salt changes every key: nothing is indexed for the salted prompt
        salted = keyer.keys(prompt, cache_salt="tenant-9")
        out["salted_overlap"] = max(proxy.index.overlap(w, [index_key(k) for k in salted]) for w in (0, 1))
        out["text"] = await ask({"model": "m", "prompt": "hello there", "max_tokens": 4})
        bad = await client.post("/v1/completions", data=b"{not json")
        out["bad"] = bad.status, await bad.json()
        unknown = await client.get("/v1/models")
        out["unknown"] = unknown.status, await unknown.json()
        out["served"] = [len(s.served) for s in stubs]
        out["active"] = sum(len(load.active) for load in proxy.router.loads.values())
    finally:
        await client.close()
        for server in servers:
            await server.close()
        for s in stubs:
            s.publisher.close()
    return out


def test_route_proxy_places_by_vllm_events() -> None:
    out = asyncio.run(_scenario())
    assert out["followups"] == [out["first"]] * 5  # by chance alone: 1 in 32
    assert out["salted_overlap"] == 0
    assert out["text"][0] == 200 and out["text"][1] in ("a", "b")
    assert out["bad"] == (
        400,
        {
            "error": {
                "message": "the body is not JSON",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        },
    )
    assert out["unknown"] == (
        404,
        {
            "error": {
                "message": "Invalid URL (GET /v1/models)",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        },
    )
    assert sum(out["served"]) == 6  # six token-id prompts; the text prompt is not recorded
    assert out["active"] == 0  # every forwarded request was finished in the router


def test_engine_spec() -> None:
    assert EngineEndpoint.parse("http://h:8000/,tcp://h:5557") == EngineEndpoint(
        "http://h:8000", "tcp://h:5557"
    )
    assert EngineEndpoint.parse("http://h:8000,tcp://h:5557,tcp://h:5558").replay == "tcp://h:5558"
    with pytest.raises(ConfigError, match="URL,EVENTS"):
        EngineEndpoint.parse("h:8000")


async def _salts_scenario(config: ServeConfig) -> tuple[list[int], list[str | None]]:
    """Each caller's status, and the cache_salt the engine got for each request it was sent."""
    keyer = VllmKeyer(BLOCK, "sha256_cbor", "0")
    stub = StubEngine("a", keyer)
    server = TestServer(stub.app())
    await server.start_server()
    engine = EngineEndpoint(str(server.make_url("")).rstrip("/"), stub.events)
    proxy = RouteProxy([engine], keyer, capacity_blocks=1000, config=config)
    client = TestClient(TestServer(proxy.app()))
    await client.start_server()
    statuses = []
    try:
        for key, salt in (
            (None, "acme"),
            ("sk-globex", "acme"),
            ("sk-acme", None),
            ("sk-acme", "s"),
            ("sk-initech", None),
            ("sk-initech", "x"),
        ):
            body: dict[str, Any] = {"model": "m", "prompt": list(range(40)), "max_tokens": 1}
            if salt is not None:
                body["cache_salt"] = salt
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            resp = await client.post("/v1/completions", json=body, headers=headers)
            statuses.append(resp.status)
    finally:
        await client.close()
        await server.close()
        stub.publisher.close()
    return statuses, stub.salts


@pytest.mark.parametrize("k_anonymity", [1, 2])
def test_a_vllm_engine_gets_the_callers_scope_as_cache_salt(k_anonymity: int) -> None:
    config = ServeConfig.from_dict(
        {
            "k_anonymity": k_anonymity,
            "tenants": {
                "acme": {"keys": ["sk-acme"]},
                "globex": {"keys": ["sk-globex"]},
                "initech": {"keys": ["sk-initech"], "group": "partners"},
            },
        }
    )
    statuses, salts = asyncio.run(_salts_scenario(config))
    assert statuses == [401, 200, 200, 200, 200, 200]  # the caller without a key reaches no engine
    # vLLM cannot gate a share group by k-anonymity: with k > 1 the group member is kept private
    group = "group:partners" if k_anonymity == 1 else "tenant:initech"
    assert salts == [
        "salted:13:tenant:globex:acme",
        "tenant:acme",
        "salted:11:tenant:acme:s",
        group,
        f"salted:{len(group)}:{group}:x",
    ]


def _salt_of(scope: Scope) -> str:
    """The salt kvcache workers key a scope's vLLM keys with: its keyed pseudonym."""
    return KEYS.pseudonym(scope.chain_scope)


async def _workers_scenario() -> dict[str, Any]:
    from kvcache.engine import EngineConfig
    from kvcache.serve.podtier import PodTieredEngine
    from kvcache.serve.worker import Worker
    from kvcache.vllm.events import EngineEventBridge

    keyer = VllmKeyer(BLOCK, "xxhash_cbor", "7", public_salt=public_salt(KEYS))
    workers, runners, publishers, engines = [], [], [], []
    for name in ("w0", "w1"):
        engine = PodTieredEngine.load("tiny", EngineConfig(num_blocks=64, block_size=BLOCK, seed=0))
        worker = Worker(engine, name, None, KEYS)
        events, replay = f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"
        publisher = EventPublisher(events, replay)
        worker.vllm_events = EngineEventBridge(publisher, keyer, engine.manager, KEYS.pseudonym)  # opt-in
        runners.append(await worker.start("127.0.0.1", 0))
        workers.append(worker)
        publishers.append(publisher)
        engines.append(EngineEndpoint(worker.url, events, replay))
    opener = peer.opener(KEYS, aiohttp.ClientTimeout(total=60))
    proxy = RouteProxy(
        engines, keyer, capacity_blocks=64, api="kvcache", connect_worker=opener, cache_salt_of=_salt_of
    )
    client = TestClient(TestServer(proxy.app()))
    await client.start_server()
    out: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 10
        while any(sub.next_seq is None for sub in proxy.subscribers):
            for p in publishers:
                p.publish([])
            await asyncio.sleep(0.05)
            proxy.poll_events()
            assert time.monotonic() < deadline

        async def ask(prompt: list[int], salt: str | None = None) -> tuple[str, int]:
            body: dict[str, Any] = {"model": "tiny", "prompt": prompt, "max_tokens": 2}
            if salt:
                body["cache_salt"] = salt
            resp = await client.post("/v1/completions", json=body)
            data = await resp.json()
            assert resp.status == 200, data
            assert len(data["choices"][0]["token_ids"]) == 2
            return resp.headers["x-kvcache-engine"], data["usage"]["prompt_tokens_details"]["cached_tokens"]

        prompt = [(7 * i) % 250 + 3 for i in range(64)]  # four full blocks
        first, cached0 = await ask(prompt)
        deadline = time.monotonic() + 10
        keys = keyer.keys(prompt, cache_salt=_salt_of(Scope("default")))
        while proxy.index.overlap(int(first), [index_key(k) for k in keys]) < 4:  # its events arrived
            await asyncio.sleep(0.02)
            assert time.monotonic() < deadline
        followups = []
        for k in (1, 2, 3):  # each turn 100 ms apart, past the router's modelled prefill
            await asyncio.sleep(0.1)
            followups.append(await ask([*prompt, *range(300, 300 + 8 * k)]))
        out.update(first=first, followups=followups, cached0=cached0)
        # the same tokens under a salt (another tenant on the worker) share no key
        salted = keyer.keys(prompt, cache_salt=_salt_of(Scope("default", salt="acme")))
        out["salted_overlap"] = proxy.index.overlap(int(first), [index_key(k) for k in salted])
        _, out["salted_cached"] = await ask(prompt, salt="acme")
        bad = await client.post("/v1/completions", json={"model": "tiny", "prompt": "text", "max_tokens": 2})
        out["text_status"] = bad.status
    finally:
        await client.close()
        for runner in runners:
            await runner.cleanup()
        for worker in workers:
            await worker.aengine.close()
        for p in publishers:
            p.close()
    return out


def test_route_proxy_in_front_of_kvcache_workers(torch_one_thread: None) -> None:
    out = asyncio.run(_workers_scenario())
    assert out["cached0"] == 0
    # routed by the worker's vLLM-format events (by chance alone: 1 in 8), and the worker reused
    # the four blocks, then also the fifth the second follow-up filled (tokens 300-315)
    assert out["followups"] == [(out["first"], 64), (out["first"], 64), (out["first"], 80)]
    assert out["salted_overlap"] == 0 and out["salted_cached"] == 0
    assert out["text_status"] == 400
