"""Faults over HTTP: a worker killed mid-run, a worker restarted, Redis stopped mid-run.

Runs in file order on the session's shared deployment, after the other end-to-end modules:
each test leaves the deployment as the next one expects it, and the last one stops its Redis.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from serve_harness import Deployment, ids, shared

KEY = "sk-acme"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Deployment:
    return shared(tmp_path_factory, pytestconfig)


def text_of(chunks: list[Any]) -> str:
    return "".join(c["choices"][0]["text"] for c in chunks if c != "[DONE]" and c["choices"])


def test_killing_a_worker_mid_run_loses_and_repeats_nothing(server: Deployment) -> None:
    prompts = [ids(100 + i, 48) for i in range(8)]
    first_tokens = threading.Semaphore(0)
    body = {"max_tokens": 24, "stream_options": {"include_usage": True}}

    def one(prompt: list[int]) -> list[Any]:
        seen = []

        def on_chunk(chunk: Any) -> None:
            if not seen:
                seen.append(chunk)
                first_tokens.release()

        return server.stream("/v1/completions", {**body, "prompt": prompt}, key=KEY, on_chunk=on_chunk)

    victim = server.workers()["w0"]["pid"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(one, p) for p in prompts]
        assert first_tokens.acquire(timeout=60)  # requests are streaming now
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=120) for f in futures]
    for prompt, chunks in zip(prompts, results, strict=True):
        assert chunks[-1] == "[DONE]"
        assert chunks[-2]["usage"]["completion_tokens"] == 24
        tokens = [c for c in chunks[:-1] if c["choices"] and c["choices"][0]["finish_reason"] is None]
        assert len(tokens) == 24  # one chunk per token: none lost, none twice
        again = server.request("/v1/completions", {"prompt": prompt, "max_tokens": 24}, key=KEY)[1]
        assert text_of(chunks) == again["choices"][0]["text"]  # the retried stream continued the same text
    assert set(server.workers()) == {"w1"}
    assert server.metric("kvcache:workers") == 1


def test_a_restarted_worker_rejoins_and_its_events_rebuild_the_view(server: Deployment) -> None:
    server.start_worker("w0")
    server.wait_for("w0 to rejoin", lambda: "w0" in server.workers(), 60)
    assert server.workers()["w0"]["indexed_blocks"] == 0  # nothing of the killed instance survives
    for seed in range(200, 206):
        server.request("/v1/completions", {"prompt": ids(seed, 64), "max_tokens": 2}, key=KEY)
    server.wait_for("w0's events", lambda: server.workers()["w0"]["indexed_blocks"] > 0)
    blocks = server.workers()["w0"]["indexed_blocks"]
    assert blocks % 4 == 0 and blocks >= 4  # whole 64-token prompts: 4 blocks each


def test_serving_continues_when_redis_stops(server: Deployment) -> None:
    pod = {"tier": "pod", "tenant": "acme"}
    queries = server.metric("kvcache:prefix_cache_queries_total", **pod)
    hits = server.metric("kvcache:prefix_cache_hits_total", **pod)
    server.redis.stop()
    server.wait_for("the front to notice", lambda: server.request("/health")[1]["redis"] is False)
    for seed in range(300, 304):
        status, body = server.request("/v1/completions", {"prompt": ids(seed, 40), "max_tokens": 3}, key=KEY)
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert len(server.workers()) == 2  # known workers stay routable without heartbeats
    # Every prompt token was asked of the pod tier, none found: misses, each failed access counted.
    assert server.metric("kvcache:prefix_cache_queries_total", **pod) == queries + 4 * 40
    assert server.metric("kvcache:prefix_cache_hits_total", **pod) == hits
    assert server.metric("kvcache:tier_errors_total") >= 4
