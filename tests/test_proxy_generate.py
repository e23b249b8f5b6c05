"""``kvcache route`` in front of a kvcache worker speaks ``/generate`` through the one client
(``peer.generate``): the answer's ``finish_reason`` is the worker's, a refusal keeps its status,
and a stream cut short is a 502, never a 500. For the same worker lines it answers with the fields
``kvcache serve``'s front answers with, streamed or not, and sends the worker the same body."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from deployment import KEYS
from serve_harness import free_port
from test_serve_front import ScriptedWorker, run_front

from kvcache.serve import wire
from kvcache.serve.config import ServeConfig
from kvcache.serve.front import Front
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


def events(raw: bytes) -> list[Any]:
    """A server-sent event stream as its JSON payloads ("[DONE]" kept as the string)."""
    out = []
    for event in raw.decode().split("\n\n"):
        if event:
            assert event.startswith("data: "), event
            payload = event.removeprefix("data: ")
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def scenario(lines: list[bytes], status: int = 200, **extra: Any) -> tuple[int, Any]:
    """The proxy's answer to a completion (``extra``: more body fields) from a worker that writes
    ``lines`` (or refuses with ``status``): the JSON body, or a stream's events."""

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
            body = {"model": "m", "prompt": PROMPT, "max_tokens": 4, **extra}
            async with session.post(f"http://127.0.0.1:{front_port}/v1/completions", json=body) as resp:
                if resp.content_type == "text/event-stream":
                    return resp.status, events(await resp.read())
                return resp.status, await resp.json()
        finally:
            await runner.cleanup()
            await worker.cleanup()


def run(lines: list[bytes], status: int = 200, **extra: Any) -> tuple[int, Any]:
    return asyncio.run(asyncio.wait_for(scenario(lines, status, **extra), 60))


def test_the_answer_carries_the_workers_finish_reason_and_cached_tokens() -> None:
    first = wire.GenerateLine(token_id=11, index=0, prompt_tokens=39, cached_tokens=32)
    lines = [first, wire.GenerateLine(token_id=12, index=1)]
    done = wire.GenerateLine(done=True, engine_s=0.1, finish_reason="stop")
    status, answer = run([wire.encode_line(x) for x in [*lines, done]])
    assert status == 200, answer
    choice = {"index": 0, "text": "", "finish_reason": "stop", "logprobs": None, "token_ids": [11, 12]}
    assert answer["choices"][0] == choice
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


def test_a_refusal_after_the_stream_started_is_its_last_event() -> None:
    in_band = [
        wire.encode_line(wire.GenerateLine(token_id=1, index=0)),
        b'{"error":"quota reached","status":429}\n',
    ]
    status, got = run(in_band, stream=True)
    assert status == 200 and len(got) == 2 and got[0]["choices"][0]["token_ids"] == [1]
    assert got[1]["error"]["message"] == "quota reached" and got[1]["error"]["code"] == "rate_limit_exceeded"
    status, got = run([wire.encode_line(wire.GenerateLine(token_id=1, index=0))], stream=True)  # no done
    assert status == 200 and "ended early" in got[-1]["error"]["message"]


def test_the_body_is_checked_as_the_front_checks_it_before_a_worker_sees_it() -> None:
    done = [wire.encode_line(wire.GenerateLine(done=True, finish_reason="length"))]
    status, got = run(done, stop=["\n"])
    assert status == 400 and got["error"]["param"] == "stop" and "no tokenizer" in got["error"]["message"]
    status, got = run(done, max_tokens=0)
    assert status == 400 and got["error"]["param"] == "max_tokens"
    status, got = run(done, temprature=0.5)  # a typo is refused, never ignored
    assert status == 400 and got["error"]["param"] == "temprature"


# ---- the proxy answers as kvcache serve's front does, for the same worker lines ----------------

FIRST = wire.GenerateLine(token_id=11, index=0, prompt_tokens=39, cached_tokens=32)
LINES = [FIRST, wire.GenerateLine(token_id=12, index=1), wire.GenerateLine(done=True, finish_reason="stop")]


def shape(body: Any) -> Any:
    """The keys of an answer, nested; a choice's ``token_ids`` (the proxy's addition) left out."""
    if isinstance(body, dict):
        return {k: shape(v) for k, v in body.items() if k != "token_ids"}
    if isinstance(body, list):
        return [shape(v) for v in body]
    return type(body).__name__


def test_the_proxy_answers_with_the_fronts_fields_streamed_or_not() -> None:
    sent: list[dict[str, Any]] = []

    async def scripted(request: web.Request) -> web.StreamResponse:
        sent.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for line in LINES:
            await response.write(wire.encode_line(line))
        return response

    answers: dict[str, Any] = {}

    async def scenario(front: Front, front_url: str) -> None:
        worker_url = front.pool.workers["w0"].reg.url
        async with aiohttp.ClientSession(headers=KEYS.call_headers("w0", "i0")) as session:

            @contextlib.asynccontextmanager
            async def connect(url: str) -> AsyncIterator[ScriptedLink]:
                yield ScriptedLink(url, session)

            proxy = RouteProxy(
                [EngineEndpoint(worker_url, f"tcp://127.0.0.1:{free_port()}")],
                VllmKeyer(16),
                capacity_blocks=64,
                api="kvcache",
                connect_worker=connect,
                cache_salt_of=lambda scope: "p:test",
            )
            runner = proxy.runner()
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0.5, "seed": 3}
            streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
            try:
                async with aiohttp.ClientSession() as client:
                    for name, url in (("front", front_url), ("proxy", f"http://127.0.0.1:{port}")):
                        async with client.post(url + "/v1/completions", json=body) as resp:
                            assert resp.status == 200, await resp.text()
                            answers[name] = await resp.json()
                        async with client.post(url + "/v1/completions", json=streamed) as resp:
                            assert resp.status == 200 and resp.content_type == "text/event-stream"
                            answers[name + " streamed"] = events(await resp.read())
            finally:
                await runner.cleanup()

    run_front(ScriptedWorker(scripted), scenario)
    front, proxy = answers["front"], answers["proxy"]
    assert shape(proxy) == shape(front)  # the same keys, nested, each holding the same type
    assert (
        proxy["usage"]
        == front["usage"]
        == {
            "prompt_tokens": 39,
            "completion_tokens": 2,
            "total_tokens": 41,
            "prompt_tokens_details": {"cached_tokens": 32},
        }
    )
    assert proxy["choices"][0]["finish_reason"] == front["choices"][0]["finish_reason"] == "stop"
    assert proxy["choices"][0]["token_ids"] == [11, 12]
    front_events, proxy_events = answers["front streamed"], answers["proxy streamed"]
    assert shape(proxy_events) == shape(front_events)  # 2 tokens, the end, the usage, [DONE]
    assert [e["choices"][0]["token_ids"] for e in proxy_events[:3]] == [[11], [12], []]
    assert proxy_events[2]["choices"][0]["finish_reason"] == front_events[2]["choices"][0]["finish_reason"]
    assert proxy_events[3]["usage"] == front_events[3]["usage"] == front["usage"]
    # One wire format: both sent the worker the same /generate body, but for the request id.
    assert len(sent) == 4 and all(s["request_id"] for s in sent)
    assert {json.dumps({**s, "request_id": ""}, sort_keys=True) for s in sent} == {
        json.dumps(
            {
                "request_id": "",
                "token_ids": PROMPT,
                "tenant": "default",
                "max_tokens": 4,
                "temperature": 0.5,
                "seed": 3,
            },
            sort_keys=True,
        )
    }
