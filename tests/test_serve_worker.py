"""A worker over HTTP in-process: admission by block count, and stopping generation when the front
goes away (mid-decode, or while the request still waits for the engine thread)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
from deployment import KEYS

from kvcache.serve.worker import Worker


class FakeEngine:
    """The engine surface a worker uses; steps take ``step_s`` and a request waits for its gate."""

    def __init__(self, step_s: float = 0.005) -> None:
        self.manager = SimpleNamespace(block_size=16, pool=SimpleNamespace(num_blocks=1024),
                                       config=SimpleNamespace(model_id="fake"))  # fmt: skip
        self.vocab_size = 256
        self.step_s = step_s
        self.started: list[str] = []
        self.produced: dict[str, int] = {}
        self.closed: dict[str, threading.Event] = {}
        self.gates: dict[str, threading.Event] = {}

    def drain_events(self) -> list[Any]:
        return []

    def stream(self, token_ids: list[int], scope: Any, max_new_tokens: int, request_id: str) -> Iterator[Any]:
        self.started.append(request_id)
        self.produced[request_id] = 0
        self.closed.setdefault(request_id, threading.Event())
        return self._steps(len(token_ids), max_new_tokens, request_id)

    def _steps(self, n: int, max_new_tokens: int, request_id: str) -> Iterator[Any]:
        try:
            gate = self.gates.get(request_id)
            if gate is not None:
                assert gate.wait(60)
            for index in range(max_new_tokens):
                time.sleep(self.step_s)
                self.produced[request_id] += 1
                yield SimpleNamespace(token_id=7, index=index, prompt_tokens=n, cached_tokens=0,
                                      elapsed_s=0.0, timings=None)  # fmt: skip
        finally:
            self.closed[request_id].set()


def run_worker(engine: Any, scenario: Callable[[str], Awaitable[None]]) -> None:
    async def main() -> None:
        worker = Worker(engine, "w0", None, KEYS)
        runner = await worker.start("127.0.0.1", 0)
        try:
            await asyncio.wait_for(scenario(worker.url), 120)
        finally:
            await runner.cleanup()
            worker.executor.shutdown(wait=True)

    asyncio.run(main())


def body(request_id: str, n: int, max_tokens: int) -> dict[str, Any]:
    return {"request_id": request_id, "token_ids": [5] * n, "tenant": "acme", "max_tokens": max_tokens}


async def wait_event(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 60)


def test_a_dropped_connection_stops_decoding_after_the_step_in_progress() -> None:
    engine = FakeEngine()

    async def scenario(url: str) -> None:
        long = body("r1", 8, 4096)
        session = aiohttp.ClientSession(headers=KEYS.auth_header())
        async with session, session.post(url + "/generate", json=long) as resp:
            assert resp.status == 200
            first = json.loads(await resp.content.readline())
            assert first["index"] == 0 and first["prompt_tokens"] == 8
        await wait_event(engine.closed["r1"])
        assert engine.produced["r1"] < 4096

    run_worker(engine, scenario)


def test_a_request_dropped_while_queued_never_starts() -> None:
    engine = FakeEngine()
    engine.gates["busy"] = threading.Event()

    async def scenario(url: str) -> None:
        async with aiohttp.ClientSession(headers=KEYS.auth_header()) as session:
            busy = asyncio.create_task(session.post(url + "/generate", json=body("busy", 8, 2)))
            while "busy" not in engine.started:  # the engine thread is now held by "busy"
                await asyncio.sleep(0.01)
            queued = asyncio.create_task(session.post(url + "/generate", json=body("queued", 8, 4096)))
            await asyncio.sleep(0.5)  # "queued" reached the worker and waits for the engine thread
            queued.cancel()  # the front gives up on it: its connection closes
            await asyncio.gather(queued, return_exceptions=True)
            await asyncio.sleep(0.5)
            engine.gates["busy"].set()
            resp = await busy
            assert resp.status == 200
            await resp.read()
            # One more request through the same single engine thread: everything before it ran.
            async with session.post(url + "/generate", json=body("after", 8, 1)) as after:
                assert after.status == 200
                await after.read()
        assert engine.started == ["busy", "after"]

    run_worker(engine, scenario)


def test_admission_counts_the_blocks_the_engine_needs() -> None:
    from kvcache.engine import Engine, EngineConfig

    engine = Engine.load("tiny", EngineConfig(num_blocks=4, block_size=16, device="cpu"))

    async def scenario(url: str) -> None:
        async with aiohttp.ClientSession(headers=KEYS.auth_header()) as session:
            # 60 prompt tokens + 5 new ones: the last one is never fed back, so 64 positions, 4 blocks.
            async with session.post(url + "/generate", json=body("fits", 60, 5)) as resp:
                assert resp.status == 200
                lines = [json.loads(line) for line in (await resp.read()).splitlines()]
            assert [line.get("index") for line in lines[:-1]] == [0, 1, 2, 3, 4] and lines[-1]["done"]
            async with session.post(url + "/generate", json=body("over", 60, 6)) as resp:
                assert resp.status == 400
                assert "need 5 blocks; a worker's pool holds 4" in (await resp.json())["error"]

    run_worker(engine, scenario)
