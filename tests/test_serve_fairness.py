"""Fairness between tenants at the front (``kvcache.serve.fairness``): a tenant holds at most its
share of each worker's running seats, so another tenant's request is admitted while it floods.

The first test runs the front against a scripted in-process worker; the second floods a real
``kvcache serve`` with two batched workers (``--max-num-seqs 4 --max-waiting 4``)."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from serve_harness import deploy, ids
from test_serve_front import ScriptedWorker, post, run_front

from kvcache.serve.config import ServeConfig
from kvcache.serve.fairness import TenantSeats
from kvcache.serve.front import Front

CONFIG = '[tenants.acme]\nkeys = ["sk-acme"]\n[tenants.globex]\nkeys = ["sk-globex"]\n'
TWO = ServeConfig.from_dict({"tenants": {"acme": {"keys": ["sk-acme"]}, "globex": {"keys": ["sk-globex"]}}})


def test_seats_are_a_share_of_max_num_seqs_and_at_least_one() -> None:
    seats = TenantSeats(max_num_seqs=4)
    acme, globex = TWO.tenants["acme"], TWO.tenants["globex"]
    assert seats.seats(acme) == 2 and TenantSeats(max_num_seqs=1).seats(acme) == 1
    assert seats.seats(ServeConfig().tenants["default"]) is None  # a share of 1: no cap
    seats.take("acme", "w0")
    seats.take("acme", "w0")
    assert not seats.has_room(acme, "w0") and seats.has_room(acme, "w1") and seats.has_room(globex, "w0")
    seats.give("acme", "w0")
    assert seats.has_room(acme, "w0") and seats.held("acme", "w0") == 1


def test_a_tenant_at_its_share_is_429_and_another_tenant_is_served_at_once() -> None:
    worker = ScriptedWorker(delay_s=0.05)  # 200 tokens: a stream that lasts 10 s

    async def scenario(front: Front, url: str) -> None:
        path = url + "/v1/completions"
        acme, globex = ({"Authorization": f"Bearer {key}"} for key in ("sk-acme", "sk-globex"))
        async with aiohttp.ClientSession() as session:
            streams = []
            for _ in range(2):  # acme's share: 0.5 of 4 seats on the one worker
                stream = await session.post(
                    path, json={"prompt": "hi", "max_tokens": 200, "stream": True}, headers=acme
                )
                assert stream.status == 200 and (await stream.content.readline()).startswith(b"data: {")
                streams.append(stream)
            async with session.post(path, json={"prompt": "hi", "max_tokens": 3}, headers=acme) as resp:
                assert resp.status == 429 and resp.headers["Retry-After"] == "1"
                error = (await resp.json())["error"]
            assert error["code"] == "rate_limit_exceeded" and error["param"] is None
            assert "tenant 'acme' has 2 request(s) in flight on each worker" in error["message"]
            assert "its share (0.5 of 4 seats per worker)" in error["message"]
            status, body = await post(path, {"prompt": "hi", "max_tokens": 3}, headers=globex)
            assert status == 200 and body["choices"][0]["text"] == "abc"
            assert len(worker.bodies) == 3  # the refused request never reached the worker
            for stream in streams:
                stream.close()  # acme's streams end: its seats come back
            await asyncio.wait_for(worker.gone.wait(), 10)
            for _ in range(100):
                if front.seats.held("acme", "w0") == 0:
                    break
                await asyncio.sleep(0.05)
            status, body = await post(path, {"prompt": "hi", "max_tokens": 3}, headers=acme)
            assert status == 200 and body["choices"][0]["text"] == "abc"

    run_front(worker, scenario, config=TWO, max_num_seqs=4)


class Stream:
    """A streamed completion; ``status`` 200 with its first token read and the stream held open,
    or the error answer."""

    def __init__(self, url: str, key: str, prompt: list[int], max_tokens: int) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
        self.conn.request(
            "POST",
            "/v1/completions",
            json.dumps(body),
            {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.error: Any = None if self.status == 200 else json.loads(self.resp.read())
        if self.status == 200:
            self.next_text()

    def next_text(self) -> str:
        line = self.resp.readline()
        while not line.startswith(b"data: "):
            line = self.resp.readline()
        return str(json.loads(line[6:])["choices"][0]["text"])

    def close(self) -> None:
        self.conn.close()


def first_token_s(url: str, key: str, prompt: list[int]) -> tuple[int, float]:
    """(status, seconds to the first streamed token) of a short streamed request."""
    started = time.monotonic()
    stream = Stream(url, key, prompt, 8)
    took = time.monotonic() - started
    stream.close()
    return stream.status, took


def test_a_flooding_tenant_leaves_another_tenants_time_to_first_token_bounded(tmp_path: Path) -> None:
    """acme opens 16 long streams (2,000 tokens) on 2 workers of 4 running + 4 waiting seats:
    it gets its share (2 per worker), the rest are 429 at once, and globex's requests, sent
    while acme's streams run, get their first token without waiting for those to end (bound:
    30 s, generous on a loaded machine; without the share acme holds all 16 seats and globex is
    503, and with only the running seats capped globex waited 13-15 s for acme's streams)."""
    dep = deploy(tmp_path, workers=2, config=CONFIG, args=("--max-num-seqs", "4", "--max-waiting", "4"))
    streams: list[Stream] = []
    try:
        with ThreadPoolExecutor(16) as pool:
            streams = list(pool.map(lambda i: Stream(dep.url, "sk-acme", ids(100 + i, 24), 2000), range(16)))
        assert sorted(s.status for s in streams) == [200] * 4 + [429] * 12
        assert all(s.error["error"]["code"] == "rate_limit_exceeded" for s in streams if s.status == 429)
        with ThreadPoolExecutor(3) as pool:
            prompts = [ids(200 + i, 24) for i in range(3)]
            answers = list(pool.map(lambda p: first_token_s(dep.url, "sk-globex", p), prompts))
        assert [status for status, _ in answers] == [200, 200, 200]
        assert max(took for _, took in answers) < 30, answers
        # globex did not wait for acme's streams to end: the workers still run all four.
        assert dep.metric("kvcache:num_requests_running") >= 4
    finally:
        for stream in streams:
            stream.close()
        dep.stop()
