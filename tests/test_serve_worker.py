"""A worker over HTTP in-process: admission by block count, and stopping generation when the front
goes away (mid-decode, or while the request still waits for the engine thread)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
from deployment import KEYS

from kvcache.engine.engine import GenerationStep, RequestOutput
from kvcache.serve.worker import Worker

INSTANCE = "i0"
CALL = KEYS.call_headers("w0", INSTANCE)  # what the front presents to worker w0's instance i0


class FakeEngine:
    """The engine surface a worker drives (``add_request``/``step``/``abort``): each step takes
    ``step_s``, runs up to ``max_num_seqs`` requests, and waits for a running request's gate."""

    def __init__(self, step_s: float = 0.005, max_num_seqs: int = 64) -> None:
        pool = SimpleNamespace(num_blocks=1024, num_used_blocks=0)
        self.manager = SimpleNamespace(block_size=16, pool=pool, config=SimpleNamespace(model_id="fake"))
        self.scheduler = SimpleNamespace(running=[], waiting=deque())
        self.vocab_size = 256
        self.step_s = step_s
        self.max_num_seqs = max_num_seqs
        self._seqs: dict[str, Any] = {}
        self.started: list[str] = []
        self.produced: dict[str, int] = {}
        self.closed: dict[str, threading.Event] = {}
        self.gates: dict[str, threading.Event] = {}

    def drain_events(self) -> list[Any]:
        return []

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def add_request(self, token_ids: list[int], scope: Any, params: Any, request_id: str) -> str:
        self._seqs[request_id] = SimpleNamespace(
            n=len(token_ids), max_tokens=params.max_tokens, is_finished=False
        )
        self.produced[request_id] = 0
        self.closed.setdefault(request_id, threading.Event())
        self.scheduler.waiting.append(request_id)
        return request_id

    def _end(self, rid: str) -> None:
        self._seqs[rid].is_finished = True
        self.closed[rid].set()

    def abort(self, rid: str) -> bool:
        if rid in self.scheduler.running:
            self.scheduler.running.remove(rid)
        if rid in self.scheduler.waiting:
            self.scheduler.waiting.remove(rid)
        self._end(rid)
        return True

    def step(self) -> list[RequestOutput]:
        running, waiting = self.scheduler.running, self.scheduler.waiting
        while waiting and len(running) < self.max_num_seqs:
            running.append(waiting.popleft())
            self.started.append(running[-1])
        for rid in running:
            gate = self.gates.get(rid)
            if gate is not None:
                assert gate.wait(60)
        time.sleep(self.step_s)
        outputs = []
        for rid in list(running):
            seq, index = self._seqs[rid], self.produced[rid]
            self.produced[rid] += 1
            done = self.produced[rid] >= seq.max_tokens
            step = GenerationStep(7, index, seq.n, 0, 0.0)
            outputs.append(RequestOutput(rid, step, done, "length" if done else None))
            if done:
                running.remove(rid)
                self._end(rid)
        return outputs


def run_worker(engine: Any, scenario: Callable[[str], Awaitable[None]]) -> None:
    async def main() -> None:
        worker = Worker(engine, "w0", None, KEYS)
        worker.instance = INSTANCE  # the credential the test sessions carry (``CALL``) opens this one
        runner = await worker.start("127.0.0.1", 0)
        try:
            await asyncio.wait_for(scenario(worker.url), 120)
        finally:
            await runner.cleanup()
            await worker.aengine.close()

    asyncio.run(main())


def body(request_id: str, n: int, max_tokens: int) -> dict[str, Any]:
    return {"request_id": request_id, "token_ids": [5] * n, "tenant": "acme", "max_tokens": max_tokens}


async def wait_event(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 60)


def test_a_dropped_connection_stops_decoding_after_the_step_in_progress() -> None:
    engine = FakeEngine()

    async def scenario(url: str) -> None:
        long = body("r1", 8, 4096)
        session = aiohttp.ClientSession(headers=CALL)
        async with session, session.post(url + "/generate", json=long) as resp:
            assert resp.status == 200
            first = json.loads(await resp.content.readline())
            assert first["index"] == 0 and first["prompt_tokens"] == 8
        await wait_event(engine.closed["r1"])
        assert engine.produced["r1"] < 4096

    run_worker(engine, scenario)


def test_a_request_dropped_while_queued_never_starts() -> None:
    engine = FakeEngine(max_num_seqs=1)  # "queued" waits behind "busy"
    engine.gates["busy"] = threading.Event()

    async def scenario(url: str) -> None:
        async with aiohttp.ClientSession(headers=CALL) as session:
            busy = asyncio.create_task(session.post(url + "/generate", json=body("busy", 8, 2)))
            while "busy" not in engine.started:  # the engine thread is now held by "busy"
                await asyncio.sleep(0.01)
            queued = asyncio.create_task(session.post(url + "/generate", json=body("queued", 8, 4096)))
            await asyncio.sleep(0.5)  # "queued" reached the worker and waits behind "busy"
            queued.cancel()  # the front gives up on it: its connection closes
            await asyncio.gather(queued, return_exceptions=True)
            await asyncio.sleep(0.5)
            engine.gates["busy"].set()
            resp = await busy
            assert resp.status == 200
            await resp.read()
            # One more request through the same engine: everything before it ran or was aborted.
            async with session.post(url + "/generate", json=body("after", 8, 1)) as after:
                assert after.status == 200
                await after.read()
        assert engine.started == ["busy", "after"]

    run_worker(engine, scenario)


def test_admission_counts_the_blocks_the_engine_needs() -> None:
    from kvcache.engine import Engine, EngineConfig

    engine = Engine.load("tiny", EngineConfig(num_blocks=4, block_size=16, device="cpu"))

    async def scenario(url: str) -> None:
        async with aiohttp.ClientSession(headers=CALL) as session:
            # 60 prompt tokens + 5 new ones: the last one is never fed back, so 64 positions, 4 blocks.
            async with session.post(url + "/generate", json=body("fits", 60, 5)) as resp:
                assert resp.status == 200
                lines = [json.loads(line) for line in (await resp.read()).splitlines()]
            assert [line.get("index") for line in lines[:-1]] == [0, 1, 2, 3, 4] and lines[-1]["done"]
            async with session.post(url + "/generate", json=body("over", 60, 6)) as resp:
                assert resp.status == 400
                assert "need 5 blocks; a worker's pool holds 4" in (await resp.json())["error"]

    run_worker(engine, scenario)


def test_a_full_waiting_queue_answers_503_with_retry_after_and_the_page_shows_the_load() -> None:
    engine = FakeEngine(step_s=0.01, max_num_seqs=1)

    async def scenario(url: str) -> None:
        async with aiohttp.ClientSession(headers=CALL) as session:
            # The response starts with a's first token, once a no longer counts as waiting; "a" then
            # runs for 300 steps.
            first = asyncio.ensure_future(session.post(url + "/generate", json=body("a", 8, 300)))
            await asyncio.shield(first)
            second = asyncio.create_task(session.post(url + "/generate", json=body("b", 8, 2)))
            while list(engine.scheduler.waiting) != ["b"]:
                await asyncio.sleep(0.01)
            async with session.post(url + "/generate", json=body("c", 8, 2)) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
                assert "w0 has 1 waiting request(s) (--max-waiting 1)" in (await resp.json())["error"]
            async with session.get(url + "/metrics") as resp:
                page = await resp.text()
            assert "kvcache:num_requests_running 1.0" in page and "kvcache:num_requests_waiting 1.0" in page
            assert "kvcache:requests_rejected_total 1.0" in page
            for task, n in ((first, 300), (second, 2)):
                resp = await task
                lines = [json.loads(line) for line in (await resp.read()).splitlines()]
                assert [line.get("index") for line in lines] == [*range(n), None]
                assert lines[-1]["done"] and lines[-1]["finish_reason"] == "length"
        assert engine.started == ["a", "b"]

    async def main() -> None:
        worker = Worker(engine, "w0", None, KEYS, max_waiting=1)
        worker.instance = INSTANCE
        runner = await worker.start("127.0.0.1", 0)
        try:
            await asyncio.wait_for(scenario(worker.url), 120)
        finally:
            await runner.cleanup()
            await worker.aengine.close()

    asyncio.run(main())


def test_sampling_fields_are_checked_before_the_engine_sees_them() -> None:
    engine = FakeEngine()

    async def scenario(url: str) -> None:
        async with aiohttp.ClientSession(headers=CALL) as session:
            bad = (
                ({"temperature": -1}, "temperature=-1"),
                ({"top_p": 0}, "top_p=0"),
                ({"top_k": 1.5}, "'top_k'=1.5"),
                ({"seed": "x"}, "'seed'='x'"),
            )
            for extra, needle in bad:
                async with session.post(url + "/generate", json={**body("r", 8, 2), **extra}) as resp:
                    assert resp.status == 400 and needle in (await resp.json())["error"]
        assert engine.started == []

    run_worker(engine, scenario)


def test_a_body_that_is_not_a_generate_request_is_a_400_naming_the_field() -> None:
    engine = FakeEngine()

    async def scenario(url: str) -> None:
        good = json.dumps(body("r", 8, 2))
        bad = (
            (json.dumps({**body("r", 8, 2), "tenant": 7}), "'tenant'=7 is refused"),
            (json.dumps({**body("r", 8, 2), "group": ""}), "group='' must be None or a non-empty string"),
            (json.dumps({"request_id": "r", "token_ids": [5], "max_tokens": 2}), "'tenant' is missing"),
            (good[:-1] + ', "extra": ' + "[" * 100_000 + "}", "the /generate body is not valid JSON"),
            ("[]", "the /generate body must be a JSON object"),
        )
        async with aiohttp.ClientSession(headers=CALL) as session:
            for raw, needle in bad:
                async with session.post(url + "/generate", data=raw) as resp:
                    assert resp.status == 400 and needle in (await resp.json())["error"], needle
        assert engine.started == []

    run_worker(engine, scenario)
