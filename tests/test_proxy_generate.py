"""``kvcache route`` in front of a kvcache worker speaks ``/generate`` through the one client
(``peer.generate``): the answer's ``finish_reason`` is the worker's, a refusal keeps its status,
and a stream cut short is a 502, never a 500."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from serve_harness import free_port

from kvcache.serve import wire
from kvcache.serve.config import ServeConfig
from kvcache.vllm.keys import VllmKeyer
from kvcache.vllm.proxy import EngineEndpoint, RouteProxy

PROMPT = list(range(1, 40))


class ScriptedLink:
    """A proven link's stand-in: ``post`` goes to a scripted worker on loopback."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url, self.session = url, session

    @contextlib.asynccontextmanager
    async def post(self, path: str, **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        async with self.session.post(self.url + path, **kwargs) as resp:
            yield resp


async def scenario(lines: list[bytes], status: int = 200) -> tuple[int, Any]:
    async def generate(request: web.Request) -> web.StreamResponse:
        await request.read()
        if status != 200:
            return web.json_response({"error": "over quota"}, status=status)
        response = web.StreamResponse()
        await response.prepare(request)
        for line in lines:
            await response.write(line)
        return response

    app = web.Application()
    app.router.add_post("/generate", generate)
    worker = web.AppRunner(app)
    await worker.setup()
    port = free_port()
    await web.TCPSite(worker, "127.0.0.1", port).start()
    async with aiohttp.ClientSession() as session:

        @contextlib.asynccontextmanager
        async def connect(url: str) -> AsyncIterator[ScriptedLink]:
            yield ScriptedLink(url, session)

        proxy = RouteProxy(
            [EngineEndpoint(f"http://127.0.0.1:{port}", f"tcp://127.0.0.1:{free_port()}")],
            VllmKeyer(16),
            capacity_blocks=64,
            api="kvcache",
            config=ServeConfig(),
            connect_worker=connect,
            cache_salt_of=lambda scope: "p:test",
        )
        runner = proxy.runner()
        await runner.setup()
        front_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", front_port).start()
        try:
            body = {"model": "m", "prompt": PROMPT, "max_tokens": 4}
            async with session.post(f"http://127.0.0.1:{front_port}/v1/completions", json=body) as resp:
                return resp.status, await resp.json()
        finally:
            await runner.cleanup()
            await worker.cleanup()


def run(lines: list[bytes], status: int = 200) -> tuple[int, Any]:
    return asyncio.run(asyncio.wait_for(scenario(lines, status), 60))


def test_the_answer_carries_the_workers_finish_reason_and_cached_tokens() -> None:
    first = wire.GenerateLine(token_id=11, index=0, prompt_tokens=39, cached_tokens=32)
    lines = [first, wire.GenerateLine(token_id=12, index=1)]
    done = wire.GenerateLine(done=True, engine_s=0.1, finish_reason="stop")
    status, answer = run([wire.encode_line(x) for x in [*lines, done]])
    assert status == 200, answer
    assert answer["choices"][0] == {"index": 0, "text": "", "token_ids": [11, 12], "finish_reason": "stop"}
    assert answer["usage"]["prompt_tokens"] == 39 and answer["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 32
    }


def test_a_refusal_keeps_its_status_and_a_broken_stream_is_a_502() -> None:
    status, answer = run([], status=429)
    assert status == 429 and answer["error"]["message"] == "over quota"
    in_band = [
        wire.encode_line(wire.GenerateLine(token_id=1, index=0)),
        b'{"error":"quota reached","status":429}\n',
    ]
    status, answer = run(in_band)
    assert status == 429 and "quota reached" in answer["error"]["message"]
    status, answer = run([wire.encode_line(wire.GenerateLine(token_id=1, index=0))])  # no done line
    assert status == 502 and "ended early" in answer["error"]["message"]
    status, answer = run([b"not json\n"])
    assert status == 502 and "malformed" in answer["error"]["message"]
