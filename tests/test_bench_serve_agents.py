"""``benches/bench_serve_agents.py`` without a model: the keys each contender sends, its
``openai``-client loop against a tiny scripted server, and the aggregation into medians, ratios and
the table. Its workload, ``workloads.persistent_agents``, is tested in test_workloads.py."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kvcache.lab.trace import prompt_text
from kvcache.lab.workloads import persistent_agents
from kvcache.serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sa() -> ModuleType:
    path = ROOT / "benches" / "bench_serve_agents.py"
    spec = importlib.util.spec_from_file_location("_bench_serve_agents", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_config_gives_every_request_of_every_round_its_own_tenant(sa: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(sa.tenant_config(tenants=2, rounds=2, requests_per_round=3))
    config = ServeConfig.load(path)
    assert config.keys["sk-tenant1"] == "tenant1"
    assert config.keys["sk-r0-0"] == "r0-0" and config.keys["sk-r2-2"] == "r2-2"
    assert len(config.keys) == 2 + 3 * 3  # two tenants, rounds 0 (warm-up) to 2 of three requests
    req = persistent_agents(num_tenants=1, sessions_per_tenant=1, turns=1, system_words=16)[0]
    assert sa._tenant_key(5, 7, req) == "sk-tenant0"
    assert sa._request_key(5, 7, req) == "sk-r5-7"


class ScriptedServer:
    """``/v1/completions`` streaming two text chunks and the usage: prompt tokens = words,
    cached = half of them for a tenant's key (``sk-tenant*``), none otherwise; ``details`` False
    leaves ``prompt_tokens_details`` out, as ``transformers serve`` does."""

    def __init__(self, details: bool) -> None:
        self.details = details
        self.keys: list[str] = []
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _complete(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        self.keys.append(request.headers["Authorization"].removeprefix("Bearer "))
        words = len(body["prompt"].split())
        cached = words // 2 if self.keys[-1].startswith("sk-tenant") else 0
        usage: dict[str, Any] = {"prompt_tokens": words, "completion_tokens": 2, "total_tokens": words + 2}
        if self.details:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "c", "object": "text_completion", "created": 0, "model": body["model"]}
        for text in ("a", "b"):
            chunk = {**base, "choices": [{"index": 0, "text": text, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/v1/completions", self._complete)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture()
def scripted() -> Iterator[tuple[ScriptedServer, ScriptedServer]]:
    with ScriptedServer(details=True) as kv, ScriptedServer(details=False) as peer:
        yield kv, peer


def test_a_round_through_the_openai_client_then_medians_ratios_and_table(
    sa: ModuleType, scripted: tuple[ScriptedServer, ScriptedServer]
) -> None:
    kv, peer = scripted
    reqs = persistent_agents(
        num_tenants=2,
        sessions_per_tenant=2,
        turns=2,
        system_words=32,
        document_words=(10, 10),
        question_words=4,
        answer_words=4,
        output_tokens=2,
    )

    def server(name: str, url: str, keys: Any) -> Any:
        return sa.Server(name, url, "m", None, Path("-"), keys)  # no process: the scripted one answers

    servers = {
        "sharing": server("sharing", kv.url, sa._tenant_key),
        "no-sharing": server("no-sharing", kv.url, sa._request_key),
        "transformers": server("transformers", peer.url, sa._no_key),
    }
    rounds = []
    for number in (1, 2):
        this = {}
        for name, server in servers.items():
            results, wall_s, reported = asyncio.run(sa.run_round(server, reqs, number, concurrency=3))
            # In request order, whichever client sent each.
            assert [r.prompt_tokens for r in results] == [len(prompt_text(r).split()) for r in reqs]
            assert all(r.ok and r.output_tokens == 2 and r.ttft_s > 0 for r in results)
            this[name] = sa.round_figures(results, wall_s, reported, 3, (1.0, 2.0))
        rounds.append(this)
    # The keys each contender sent: one per tenant, one per request of each round, none.
    sent = kv.keys
    assert set(sent[:8]) == {"sk-tenant0", "sk-tenant1"}
    assert sorted(sent[8:16]) == sorted(f"sk-r1-{i}" for i in range(8))
    assert sorted(sent[24:32]) == sorted(f"sk-r2-{i}" for i in range(8))
    assert peer.keys == ["none"] * 16
    words = sum(len(prompt_text(r).split()) for r in reqs)
    first = rounds[0]
    assert first["sharing"]["cached"] == sum(len(prompt_text(r).split()) // 2 for r in reqs) / words
    assert first["no-sharing"]["cached"] == 0.0
    assert first["transformers"]["cached"] is None  # not reported: n/a, never 0
    assert first["sharing"]["completed"] == 8 and first["sharing"]["failed"] == 0
    assert first["sharing"]["prompt_tokens"] == words / 8
    m = sa.medians(rounds)
    assert m["sharing"]["rounds"] == 2 and m["transformers"]["cached"] is None
    assert m["sharing"]["load_before"] == 1.0 and m["sharing"]["load_after"] == 2.0
    lines = sa.table(m)
    assert lines[0].startswith("| contender | wall s | req/s |")
    assert "| `transformers serve --continuous-batching` |" in lines[4] and "| n/a |" in lines[4]
    assert "| 0.0% |" in lines[3]
    assert lines[2].count("|") == lines[0].count("|")


def test_medians_over_rounds_and_the_ratios(sa: ModuleType) -> None:
    def figures(req_s: float, p50: float, cached: float | None) -> dict[str, Any]:
        return {
            "tpot_ms": 300.0,
            "ttft_share": 0.5,
            "wall_s": 10 / req_s,
            "req_s": req_s,
            "ttft_p50_s": p50,
            "ttft_p99_s": 2 * p50,
            "cached": cached,
            "prompt_tokens": 100.0,
            "output_tokens": 32,
            "completed": 10,
            "failed": 0,
            "errors": [],
            "load_before": 2.0,
            "load_after": 3.0,
        }

    rounds = [
        {
            "sharing": figures(1.0, 0.5, 0.9),
            "no-sharing": figures(0.2, 4.0, 0.0),
            "transformers": figures(0.5, 1.0, None),
        },
        {
            "sharing": figures(2.0, 0.3, 0.8),
            "no-sharing": figures(0.4, 3.0, 0.0),
            "transformers": figures(0.6, 1.2, None),
        },
        {
            "sharing": figures(1.5, 0.4, 0.85),
            "no-sharing": figures(0.3, 5.0, 0.0),
            "transformers": figures(0.7, 0.8, None),
        },
    ]
    m = sa.medians(rounds)
    assert (m["sharing"]["req_s"], m["sharing"]["ttft_p50_s"], m["sharing"]["cached"]) == (1.5, 0.4, 0.85)
    assert m["no-sharing"]["req_s"] == 0.3 and m["transformers"]["req_s"] == 0.6
    q = sa.ratios(m)
    assert q == pytest.approx(
        {
            "sharing_over_no_sharing_req_s": 5.0,
            "kvcache_over_transformers_req_s": 2.5,
            "transformers_over_kvcache_ttft_p50_s": 2.5,
            "transformers_over_kvcache_ttft_p99_s": 2.5,
        }
    )
    assert sa.ratios({"sharing": m["sharing"]}) == {}


def test_the_pool_holds_the_concurrent_longest_prompts(sa: ModuleType) -> None:
    short = sa.SHAPES[("short", False)].requests(seed=0)
    assert sa.num_blocks_for(short, 4) == 1024  # serve's default
    long = sa.SHAPES[("long", False)].requests(seed=0)
    longest = max(len(prompt_text(r)) // 3 + r.output_tokens for r in long)
    blocks = sa.num_blocks_for(long, 4)
    assert blocks % 1024 == 0 and blocks * 16 >= 2 * 4 * longest


def test_stopping_a_server_leaves_none_of_its_processes(sa: ModuleType, tmp_path: Path) -> None:
    """A child that outlives its server (a worker busy in a prefill) is killed with it, not orphaned."""
    import os
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    process = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    sa.stop_servers({"x": sa.Server("x", "", "m", process, tmp_path / "log", sa._no_key)})
    assert process.returncode is not None
    deadline = time.monotonic() + 30
    while True:  # killed; gone once init reaps it
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as stat:
            if stat.read().split()[2] == "Z":
                break
        assert time.monotonic() < deadline, "the child outlived its server"
        time.sleep(0.05)
