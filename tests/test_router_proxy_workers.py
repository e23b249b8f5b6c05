"""``kvcache route`` in front of a real kvcache worker, as an attacker would use it: who may call,
in which scope a request runs, what a client that goes away leaves running, and request ids
when two proxies share a worker. Each isolation check has a same-tenant hit as its control."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from deployment import KEYS
from serve_harness import free_port

from kvcache.serve import peer
from kvcache.serve.config import ServeConfig
from kvcache.vllm.keys import VllmKeyer
from kvcache.vllm.proxy import EngineEndpoint, RouteProxy

BLOCK = 16
CONFIG = """
[tenants.acme]
keys = ["sk-acme"]
[tenants.globex]
keys = ["sk-globex"]
"""
PROMPT = [(7 * i) % 250 + 3 for i in range(70)]  # four full blocks and 6 tokens


class Setup:
    """One worker on the tiny model and proxies in front of it, each served by its own runner."""

    def __init__(self, worker: Any, proxies: list[str]) -> None:
        self.worker = worker
        self.proxies = proxies

    async def direct(self, session: aiohttp.ClientSession, tenant: str, prompt: list[int]) -> int:
        """A completion sent to the worker as ``kvcache serve``'s front sends it; its cached tokens."""
        body = {
            "request_id": f"front-{time.monotonic_ns()}",
            "token_ids": prompt,
            "tenant": tenant,
            "max_tokens": 1,
        }
        headers = KEYS.call_headers(self.worker.worker_id, self.worker.instance)
        async with session.post(self.worker.url + "/generate", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            return int(json.loads(await resp.content.readline())["cached_tokens"])


@contextlib.asynccontextmanager
async def proxied(configs: list[ServeConfig | None], step_s: float = 0.0) -> AsyncIterator[Setup]:
    """A worker (each engine step slowed by ``step_s``) and one proxy per config, on loopback."""
    from kvcache.engine import EngineConfig
    from kvcache.serve.podtier import PodTieredEngine
    from kvcache.serve.worker import Worker

    engine = PodTieredEngine.load("tiny", EngineConfig(num_blocks=256, block_size=BLOCK, seed=0))
    if step_s:
        step = engine.step

        def slow_step() -> Any:
            time.sleep(step_s)
            return step()

        engine.step = slow_step  # type: ignore[method-assign]
    worker = Worker(engine, "w0", None, KEYS)
    runners = [await worker.start("127.0.0.1", 0)]
    keyer = VllmKeyer(BLOCK, "xxhash_cbor", "7")
    urls = []
    try:
        for config in configs:
            # nobody publishes there
            engine_spec = EngineEndpoint(worker.url, f"tcp://127.0.0.1:{free_port()}")
            proxy = RouteProxy(
                [engine_spec],
                keyer,
                capacity_blocks=256,
                api="kvcache",
                config=config,
                connect_worker=peer.opener(KEYS, aiohttp.ClientTimeout(total=60)),
                cache_salt_of=lambda scope: KEYS.pseudonym(scope.chain_scope),
            )
            runner = proxy.runner()
            await runner.setup()
            runners.append(runner)
            await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
            urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        yield Setup(worker, urls)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        await worker.aengine.close()


async def ask(session: aiohttp.ClientSession, url: str, key: str | None, **body: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1, **body}
    async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


def cached(answer: tuple[int, Any]) -> int:
    status, data = answer
    assert status == 200, data
    return int(data["usage"]["prompt_tokens_details"]["cached_tokens"])


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_callers_authenticate_and_a_cache_salt_never_reaches_another_tenant(
    tmp_path: Path, torch_one_thread: None
) -> None:
    path = tmp_path / "serve.toml"
    path.write_text(CONFIG)
    config = ServeConfig.load(path)  # the file `kvcache serve --config` reads

    async def scenario() -> None:
        async with proxied([config, None]) as setup, aiohttp.ClientSession() as session:
            keyed, keyless = setup.proxies
            assert await setup.direct(session, "acme", PROMPT) == 0  # acme's private prompt, via the front
            # No key, or a wrong one: 401 in OpenAI's shape, whatever the body says.
            for key in (None, "sk-wrong"):
                status, data = await ask(session, keyed, key, cache_salt="acme")
                assert status == 401 and data["error"]["code"] == "invalid_api_key"
                assert data["error"]["type"] == "invalid_request_error"
            # Another tenant naming acme (or acme's chain scope) in cache_salt gets its own scope.
            assert cached(await ask(session, keyed, "sk-globex", cache_salt="acme")) == 0
            assert cached(await ask(session, keyed, "sk-globex", cache_salt="tenant:acme")) == 0
            assert cached(await ask(session, keyed, "sk-globex")) == 0
            # A keyless proxy: every caller is the tenant "default", and a salt narrows that scope.
            assert cached(await ask(session, keyless, None, cache_salt="acme")) == 0
            assert cached(await ask(session, keyless, None)) == 0
            # Positive control: acme itself hits what it cached through the front.
            assert cached(await ask(session, keyed, "sk-acme")) == 64
            # acme's salt narrows acme's scope: a sub-scope of its own, which then hits.
            assert cached(await ask(session, keyed, "sk-acme", cache_salt="s")) == 0
            assert cached(await ask(session, keyed, "sk-acme", cache_salt="s")) == 64
            # globex's earlier "acme" salt was globex's: it hits for globex only.
            assert cached(await ask(session, keyed, "sk-globex", cache_salt="acme")) == 64
            status, data = await ask(session, keyed, "sk-acme", cache_salt=7)
            assert status == 400 and data["error"]["param"] == "cache_salt"
            assert "'cache_salt'=7 must be a string" in data["error"]["message"]
            # The worker checks the scope it is sent as it checks every field: 400, never 500.
            for bad in ({"salt": 7}, {"salt": ""}, {"group": ""}):
                body = {"request_id": "bad", "token_ids": PROMPT, "tenant": "acme", "max_tokens": 1, **bad}
                url = setup.worker.url + "/generate"
                headers = KEYS.call_headers(setup.worker.worker_id, setup.worker.instance)
                async with session.post(url, json=body, headers=headers) as resp:
                    assert resp.status == 400, bad

    run(scenario)


def test_a_client_that_goes_away_stops_the_generation_on_the_worker(torch_one_thread: None) -> None:
    async def scenario() -> None:
        async with proxied([None], step_s=0.01) as setup, aiohttp.ClientSession() as session:
            engine = setup.worker.engine
            # 4000 tokens at 10 ms or more a step: the worker would decode for at least 40 s.
            long = asyncio.create_task(ask(session, setup.proxies[0], None, max_tokens=4000))
            deadline = time.monotonic() + 30
            while setup.worker.load().num_running == 0:
                assert time.monotonic() < deadline and not long.done()
                await asyncio.sleep(0.01)
            long.cancel()  # the client goes away: its connection to the proxy closes
            await asyncio.gather(long, return_exceptions=True)
            deadline = time.monotonic() + 10  # a hang guard, far below the 40 s left to decode
            while setup.worker.load().num_running or engine.has_unfinished():
                assert time.monotonic() < deadline, "the worker is still decoding for a client that left"
                await asyncio.sleep(0.02)

    run(scenario)


def test_two_proxies_on_one_worker_never_send_the_same_request_id(torch_one_thread: None) -> None:
    async def scenario() -> None:
        async with proxied([None, None], step_s=0.01) as setup, aiohttp.ClientSession() as session:
            first, second = setup.proxies
            # The first proxy's first request decodes for a while ...
            long = asyncio.create_task(ask(session, first, None, max_tokens=1000))
            deadline = time.monotonic() + 30
            while setup.worker.load().num_running == 0:
                assert time.monotonic() < deadline and not long.done()
                await asyncio.sleep(0.01)
            # ... while the second proxy's first request reaches the same worker.
            status, data = await ask(session, second, None, max_tokens=2)
            assert status == 200, data
            assert not long.done()  # both were on the worker at once
            status, data = await long
            assert status == 200 and len(data["choices"][0]["token_ids"]) == 1000
            again = (await ask(session, first, None))[1]
            assert data["id"] != again["id"] and {data["id"][:6], again["id"][:6]} == {"route-"}

    run(scenario)


def test_the_route_command_reads_serves_config_and_refuses_callers_without_a_key(tmp_path: Path) -> None:
    import signal
    import subprocess
    import urllib.error
    import urllib.request

    from kvcache.child import python_argv

    path = tmp_path / "serve.toml"
    path.write_text(CONFIG)
    port = free_port()
    engine = f"http://127.0.0.1:{free_port()},tcp://127.0.0.1:{free_port()}"  # nobody listens there
    cmd = [
        *python_argv(),
        "-m",
        "kvcache.cli",
        "route",
        "--engine",
        engine,
        "--capacity-blocks",
        "64",
        "--config",
        str(path),
        "--port",
        str(port),
    ]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def post(key: str | None) -> tuple[int, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({"prompt": [1, 2, 3], "cache_salt": "acme"}).encode(),
        )
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, data = post(None)
                break
            except OSError:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                assert time.monotonic() < deadline, "kvcache route did not start"
                time.sleep(0.1)
        assert status == 401 and data["error"]["code"] == "invalid_api_key"
        status, data = post("sk-acme")  # authenticated: on to the engine, which is not there
        assert status == 502 and data["error"]["type"] == "server_error"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
