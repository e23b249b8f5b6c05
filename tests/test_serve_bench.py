"""bench-serve's trace loading and its vllm-named summary."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from aiohttp import web

from kvcache.errors import TraceError
from kvcache.lab.serve_bench import Result, load_trace, offered, poisson_gaps, summarize, table


def test_token_and_mooncake_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    tokens = [
        {"timestamp": 0, "text": "hi", "output_length": 3, "tenant": "acme"},
        {"timestamp": 1, "tokens": [1, 2, 3], "output_length": 16, "tenant": "bob"},
    ]
    mooncake = [
        {"timestamp": 0, "input_length": 20, "output_length": 2, "hash_ids": [7, 8]},
        {"timestamp": 5, "input_length": 12, "output_length": 1, "hash_ids": [7]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in tokens) + "\n\n")
    trace = load_trace(str(path), block_tokens=16, vocab_size=256)
    assert [(r.output_tokens, r.tenant) for r in trace] == [(3, "acme"), (16, "bob")]
    assert trace[0].tokens == tuple(b"hi") and trace[1].tokens == (1, 2, 3)
    path.write_text("\n".join(json.dumps(x) for x in mooncake) + "\n")
    trace = load_trace(str(path), block_tokens=16, vocab_size=256)
    # Mooncake lines have no tenant: "default", as in a replay
    assert [(r.output_tokens, r.tenant, r.timestamp_ms) for r in trace] == [
        (2, "default", 0),
        (1, "default", 5),
    ]
    a, b = trace[0].tokens, trace[1].tokens
    assert a is not None and b is not None
    assert len(a) == 20 and len(b) == 12 and a[:12] == b  # equal hash ids, equal blocks
    assert all(1 <= t < 256 for t in a)


def test_synthetic_trace_is_the_multi_tenant_chat_workload() -> None:
    trace = load_trace("synthetic:tenants=2,sessions=1,turns=2,system=32,user=8,output=4")
    assert [r.tenant for r in trace] == ["tenant0", "tenant1", "tenant0", "tenant1"]
    assert [r.num_tokens for r in trace] == [40, 40, 52, 52]
    assert trace[0].tokens is not None and trace[1].tokens is not None
    assert trace[0].tokens[:32] == trace[1].tokens[:32]  # the shared system prompt


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("not json", ":1: not valid JSON"),
        ('{"timestamp": 0, "tenant": "a", "text": "", "output_length": 1}', "'text' is empty"),
        ('{"timestamp": 0, "tenant": "a", "text": "x", "output_length": 0}', "'output_length'=0"),
        ('{"timestamp": 0, "input_length": 99, "output_length": 1, "hash_ids": [1]}', "input_length=99"),
    ],
)
def test_bad_traces_name_the_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(TraceError) as info:
        load_trace(str(path), block_tokens=16)
    assert needle in str(info.value)
    with pytest.raises(TraceError, match="synthetic trace option 'users=3'"):
        load_trace("synthetic:users=3")


def test_summary_uses_vllm_key_names() -> None:
    results = [
        Result(True, 100, 4, 64, 0.010, 0.040, [0.01, 0.01, 0.01]),
        Result(True, 100, 4, 0, 0.030, 0.060, [0.01, 0.01, 0.01]),
        Result(False, error="HTTP 429"),
    ]
    s = summarize(results, 2.0, rate=5.0, max_concurrency=4)
    assert (s["completed"], s["failed"], s["total_input_tokens"], s["total_output_tokens"]) == (2, 1, 200, 8)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 4.0
    assert s["mean_ttft_ms"] == pytest.approx(20.0) and s["median_ttft_ms"] == pytest.approx(20.0)
    assert s["mean_tpot_ms"] == pytest.approx(10.0) and s["mean_itl_ms"] == pytest.approx(10.0)
    assert s["cache_hit_rate"] == 0.32 and s["errors"] == ["HTTP 429"]
    assert "Mean TTFT (ms)" in table(s)


def test_offered_counts_the_schedules_arrivals_within_the_duration() -> None:
    gaps = poisson_gaps(8.0, seed=0)
    due = [0.0]
    while due[-1] < 20.0:
        due.append(due[-1] + next(gaps))
    assert offered(8.0, 20.0, seed=0) == len(due) - 1  # sends are due at 0 and at each gap's end
    assert 130 < offered(8.0, 20.0, seed=0) < 190  # about rate x duration
    assert offered(8.0, 20.0, seed=0, num_prompts=5) == 5
    assert offered(float("inf"), 20.0) is None and offered(float("inf"), 20.0, num_prompts=7) == 7


def test_summary_shows_offered_sent_and_the_achieved_rate() -> None:
    results = [
        Result(True, 10, 2, 0, 0.5, 1.0, [0.5], sent_s=0.0),
        Result(True, 10, 2, 0, 0.5, 1.0, [0.5], sent_s=2.0),
        Result(False, error="HTTP 503", sent_s=4.0),
    ]
    s = summarize(results, 5.0, rate=8.0, max_concurrency=1, offered=32)
    assert (s["offered"], s["sent"], s["completed"], s["failed"]) == (32, 3, 2, 1)
    assert s["request_rate"] == 8.0 and s["achieved_request_rate"] == 0.5  # 2 sends after the first in 4 s
    shown = table(s)
    for line in ("Requests offered (rate x duration)", "Requests sent", "Achieved send rate (req/s)"):
        assert line in shown
    assert "sent 3 of 32 offered requests" in shown and "--max-concurrency 1" in shown
    unbounded = summarize(results, 5.0, rate=float("inf"), max_concurrency=1)
    assert (
        unbounded["offered"] is None
        and "unbounded" in table(unbounded)
        and "offered requests" not in (table(unbounded))
    )


class ScriptedServer:
    """An OpenAI server in a background thread: answers requests carrying ``key`` with one streamed
    token, refuses the others (and every prompt longer than 3 tokens) with an OpenAI error body."""

    def __init__(self, key: str, delay_s: float = 0.0) -> None:
        self.key = key
        self.delay_s = delay_s
        self.url = ""
        self._started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            return web.json_response({"error": {"message": "unknown API key", "code": 401}}, status=401)
        if len(body["prompt"]) > 3:
            return web.json_response(
                {"error": {"message": "prompt too long for this test", "code": 400}}, status=400
            )
        await asyncio.sleep(self.delay_s)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"text": "x"}]}\n\n')
        usage = {
            "prompt_tokens": len(body["prompt"]),
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        last = json.dumps({"choices": [], "usage": usage})
        await response.write(f"data: {last}\n\ndata: [DONE]\n\n".encode())
        return response

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({})

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/health", self.health)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        assert self._started.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


def test_bench_serve_reports_failures_with_the_server_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvcache.cli import main

    trace = tmp_path / "t.jsonl"
    lines = [
        {"timestamp": 0, "tenant": "acme", "tokens": [1, 2], "output_length": 1},
        {"timestamp": 1, "tenant": "acme", "tokens": [1, 2, 3, 4, 5], "output_length": 1},
    ]
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    monkeypatch.setenv("KVCACHE_API_KEY", "sk-env")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    argv = [
        "bench-serve",
        "",
        "--trace",
        str(trace),
        "--duration",
        "0.3",
        "--rate",
        "20",
        "--max-concurrency",
        "1",
    ]
    with ScriptedServer("sk-env") as server:
        argv[1] = server.url
        assert main(argv) == 1  # some requests failed
        out = capsys.readouterr()
        summary = json.loads(out.out[out.out.index("{") :])
        assert summary["completed"] >= 1 and summary["failed"] >= 1
        assert summary["errors"] == ["HTTP 400: prompt too long for this test"]
        assert "failed x" in out.out and "requests failed" in out.err
        assert main([*argv, "--allow-failures"]) == 0
        monkeypatch.delenv("KVCACHE_API_KEY")
        assert main([*argv, "--allow-failures"]) == 1  # nothing completed at all
        assert "HTTP 401: unknown API key" in capsys.readouterr().out  # no key: the server's message


def test_bench_serve_against_a_slow_server_says_how_many_requests_it_sent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvcache.cli import main

    monkeypatch.setenv("KVCACHE_API_KEY", "sk-env")
    with ScriptedServer("sk-env", delay_s=0.25) as server:
        trace = "synthetic:tenants=1,sessions=1,turns=1,system=1,user=1"  # 2-token prompts
        argv = [
            "bench-serve",
            server.url,
            "--trace",
            trace,
            "--duration",
            "1",
            "--rate",
            "40",
            "--max-concurrency",
            "1",
        ]
        assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{") :])
    assert summary["offered"] == offered(40.0, 1.0, seed=0) and summary["offered"] > 20
    assert 1 <= summary["sent"] <= 5 and summary["completed"] == summary["sent"]  # one at a time, 0.25 s each
    assert f"sent {summary['sent']} of {summary['offered']} offered requests" in out
    assert summary["achieved_request_rate"] < 10


def test_bench_serve_against_a_dead_url_fails_within_the_duration(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from kvcache.cli import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    assert main(["bench-serve", f"http://127.0.0.1:{port}", "--duration", "1"]) == 2
    err = capsys.readouterr().err
    assert "did not answer 200 within 1 s" in err and "Traceback" not in err
