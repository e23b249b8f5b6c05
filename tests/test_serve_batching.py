"""End to end on batched workers: concurrent streams on one worker (the worker killed under load
is ``test_serve_faults``), backpressure, client abort,
sampling fields and stop strings, over a real ``kvcache serve`` with one worker process and Redis.

The worker runs at most 3 sequences per step (``--max-num-seqs 3``) and lets 1 request wait for
its first token (``--max-waiting 1``); a fourth request at once waits, the ones after it are
answered 503 + Retry-After. Overlap is shown by the worker's own running-request gauge, never by
timing: long streams (2,000 tokens) are held open while the gauge is read.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from serve_harness import Deployment, deploy, ids

from kvcache.child import python_argv
from kvcache.serve import auth

KEY = "sk-acme"
CONFIG = '[tenants.acme]\nkeys = ["sk-acme"]\n'
LONG = 2000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    dep = deploy(
        tmp_path_factory.mktemp("batching"),
        workers=1,
        config=CONFIG,
        args=("--max-num-seqs", "3", "--max-waiting", "1", "--num-blocks", "1024"),
    )
    yield dep
    dep.stop()


def worker_metric(server: Deployment, name: str) -> float:
    """A sample of the worker's own ``/metrics`` (it takes the worker instance's credential)."""
    ((worker_id, worker),) = server.workers().items()
    headers = auth.DeploymentKeys.from_secret(server.secret).call_headers(worker_id, worker["instance"])
    req = urllib.request.Request(worker["url"] + "/metrics", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not on the worker's page")


class OpenStream:
    """A streamed completion read up to its first token and held open (the client is still there)."""

    def __init__(self, server: Deployment, prompt: list[int], max_tokens: int) -> None:
        url = urlsplit(server.url)
        self.conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
        self.conn.request(
            "POST",
            "/v1/completions",
            json.dumps(body),
            {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        self.texts = [self.next_text()]

    def next_text(self) -> str:
        line = self.resp.readline()
        while not line.startswith(b"data: "):
            line = self.resp.readline()
        return str(json.loads(line[6:])["choices"][0]["text"])

    def close(self) -> None:  # the client goes away mid-stream
        self.conn.close()


def complete(server: Deployment, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    req = urllib.request.Request(
        server.url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def test_concurrent_streams_share_the_worker_and_an_abort_frees_their_blocks(server: Deployment) -> None:
    prompts = [ids(10 + i, 24) for i in range(3)]
    # Each prompt's first 16 streamed chunks, alone (the text a client has after 16 tokens).
    alone = [server.stream("/v1/completions", {"prompt": p, "max_tokens": 16}, key=KEY) for p in prompts]
    solo = ["".join(c["choices"][0]["text"] for c in chunks[:16]) for chunks in alone]
    server.wait_for("an idle worker", lambda: worker_metric(server, "kvcache:num_requests_running") == 0)
    streams = [OpenStream(server, p, LONG) for p in prompts]  # each has its first token
    try:
        # All three are in the engine's running batch at once, and the front heard it from the
        # worker's event batches.
        assert worker_metric(server, "kvcache:num_requests_running") == 3
        assert worker_metric(server, "kvcache:kv_cache_usage_perc") > 0
        server.wait_for("the load report", lambda: server.metric("kvcache:num_requests_running") == 3)
        # Decoded together, each stream gets the tokens it gets alone (greedy).
        for stream in streams:
            stream.texts += [stream.next_text() for _ in range(15)]
        assert ["".join(stream.texts) for stream in streams] == solo
    finally:
        for stream in streams:
            stream.close()
    # The clients went away: the worker aborts their requests and frees every block they held.
    server.wait_for("the aborts", lambda: worker_metric(server, "kvcache:num_requests_running") == 0)
    assert worker_metric(server, "kvcache:kv_cache_usage_perc") == 0
    assert worker_metric(server, "kvcache:num_requests_waiting") == 0
    server.wait_for("the front's view", lambda: server.metric("kvcache:num_requests_running") == 0)


def test_a_full_worker_answers_503_with_retry_after_and_nothing_hangs(server: Deployment) -> None:
    server.wait_for("an idle worker", lambda: worker_metric(server, "kvcache:num_requests_running") == 0)
    streams = [OpenStream(server, ids(20 + i, 24), LONG) for i in range(3)]  # the batch is full
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(complete, server, {"prompt": ids(30 + i, 24), "max_tokens": 8}) for i in range(4)
            ]
            # One waits (max-waiting 1); the others are refused at once: the front has no other worker.
            server.wait_for("three answers", lambda: sum(f.done() for f in futures) == 3)
            assert worker_metric(server, "kvcache:num_requests_waiting") == 1
            refused = [f.result() for f in futures if f.done()]
            for status, body, headers in refused:
                assert status == 503 and headers["Retry-After"] == "1"
                assert body["error"]["code"] == "service_unavailable"
                assert "retry after" in body["error"]["message"]
            for stream in streams:
                stream.close()  # the batch frees up: the waiting request runs
            answered = [f.result(timeout=60) for f in futures if f.result(timeout=60)[0] != 503]
        assert [(status, body["usage"]["completion_tokens"]) for status, body, _ in answered] == [(200, 8)]
    finally:
        for stream in streams:
            stream.close()
    assert server.metric("kvcache:worker_busy_answers_total") == 3
    assert worker_metric(server, "kvcache:requests_rejected_total") == 3


def test_sampling_fields_stop_strings_and_finish_reasons(server: Deployment) -> None:
    prompt = ids(40, 24)
    status, whole, _ = complete(server, {"prompt": prompt, "max_tokens": 12})
    assert status == 200 and whole["choices"][0]["finish_reason"] == "length"
    text = whole["choices"][0]["text"]
    stop = text[5:7]
    status, cut, _ = complete(server, {"prompt": prompt, "max_tokens": 12, "stop": [stop, "never seen"]})
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    chunks = server.stream("/v1/completions", {"prompt": prompt, "max_tokens": 12, "stop": stop}, key=KEY)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == text[: text.index(stop)]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    sampled = {"prompt": prompt, "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7}
    first, again = complete(server, sampled)[1], complete(server, sampled)[1]
    assert first["choices"][0]["text"] == again["choices"][0]["text"]  # a seed makes it reproducible
    for field, value in (("n", 2), ("temperature", 3), ("top_p", 0), ("seed", "x"), ("stop", [""])):
        status, body, _ = complete(server, {"prompt": prompt, field: value})
        assert status == 400 and body["error"]["param"] == field, body


def test_the_worker_flags_are_checked(tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run(
        [*python_argv(), "-m", "kvcache.cli", "worker", "--max-num-seqs", "0"], capture_output=True, text=True
    )
    assert out.returncode != 0 and "--max-num-seqs" in out.stderr
    renamed = subprocess.run(
        [*python_argv(), "-m", "kvcache.cli", "worker", "--max-running", "4"], capture_output=True, text=True
    )
    assert renamed.returncode == 2
    assert "--max-running was renamed --max-num-seqs" in renamed.stderr
