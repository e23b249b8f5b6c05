"""Load a running server with a trace and report what ``vllm bench serve`` reports, plus cache hits.

A trace is a JSON-lines file in either format of ``kvcache.lab.trace`` (the replay's):

- token level: ``{"timestamp": ms, "tenant": "acme", "tokens": [ids] | "text": "...",
  "output_length": 32}``; tenants map to API keys through ``--config``;
- Mooncake: ``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}``; each
  hash id becomes ``block_tokens`` token ids drawn from a generator seeded by it, so equal ids give
  equal blocks (shared prefixes) and the prompt is cut to ``input_length``;

or ``synthetic[:key=value,...]`` for ``kvcache.lab.workloads.multi_turn_chat`` (keys: tenants,
sessions, turns, system, user, output, seed, shared). Either way the requests are the replay's
``TraceRequest``s with token ids; a request of a tenant ``--config`` names is sent with that tenant's
key (Mooncake requests are tenant ``default``, as in a replay), any other with ``api_key``.

Requests are sent in trace order (wrapping around) with Poisson arrivals at ``rate`` per second
(``poisson_gaps``), at most ``max_concurrency`` in flight, until ``duration_s`` has passed or
``num_prompts`` were sent; then the loop waits for the requests in flight. While
``max_concurrency`` requests are in flight the next one waits, so a server that cannot keep up is
sent fewer requests than the schedule offers: the summary reports both (``offered``, ``sent``) and
the rate the requests actually went out at. Each result keeps when it was sent
(``sent_s`` after the first send), so a simulation can replay the same arrivals. Each request
streams, so TTFT and inter-token latencies are measured at the client; ``cached_tokens`` comes
from the final usage chunk. A failed request keeps the server's error message (``HTTP 400:
'max_tokens'=...``); the summary counts failures by message. The wait
for the server to be ready is bounded by the run's duration: a dead URL is a ``ConfigError``
after ``duration_s``, not a hang.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvcache.errors import ConfigError, TraceError
from kvcache.lab import tables
from kvcache.lab.tables import Column
from kvcache.lab.trace import TraceRequest, read_trace, token_request
from kvcache.lab.workloads import multi_turn_chat


@dataclass(slots=True)
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    sent_s: float = 0.0  # seconds after the run's first send


def _synthetic(spec: str, vocab_size: int) -> list[TraceRequest]:
    names = {
        "tenants": "num_tenants",
        "sessions": "sessions_per_tenant",
        "turns": "turns",
        "system": "system_prompt_tokens",
        "user": "user_tokens",
        "output": "output_tokens",
        "seed": "seed",
        "shared": "shared_system_prompt",
    }
    kwargs: dict[str, Any] = {}
    for item in filter(None, spec.partition(":")[2].split(",")):
        key, _, value = item.partition("=")
        if key not in names or not value.isdigit():
            raise TraceError(f"synthetic trace option {item!r}: use key=integer with keys {sorted(names)}")
        kwargs[names[key]] = bool(int(value)) if key == "shared" else int(value)
    return multi_turn_chat(vocab_size=vocab_size, **kwargs)


def _expand(req: TraceRequest, block_tokens: int, vocab_size: int) -> TraceRequest:
    """A trace request with token ids; each Mooncake hash id becomes ``block_tokens`` ids drawn
    from a generator seeded by it, so equal ids give equal blocks (shared prefixes)."""
    if req.tokens is not None:
        return req
    assert req.block_ids is not None
    tokens: list[int] = []
    for h in req.block_ids:
        tokens += np.random.default_rng(h).integers(1, vocab_size, size=block_tokens).tolist()
    return token_request(tokens[: req.num_tokens], req.output_tokens, timestamp_ms=req.timestamp_ms)


def load_trace(spec: str, *, block_tokens: int = 512, vocab_size: int = 256) -> list[TraceRequest]:
    """Read a trace file (either format ``kvcache.lab.trace`` reads) or build a synthetic one."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return _synthetic(spec, vocab_size)
    trace = read_trace(spec, block_tokens)
    return [_expand(r, block_tokens, vocab_size) for r in trace.requests]


async def _one(session: Any, url: str, req: TraceRequest, headers: dict[str, str]) -> Result:
    assert req.tokens is not None, "expand block ids into tokens first (load_trace)"
    body = {
        "prompt": list(req.tokens),
        "max_tokens": req.output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    result = Result(ok=False)
    last = start
    try:
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {_message(await resp.text(errors='replace'))}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if result.output_tokens == 0:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    result.output_tokens += 1
                    last = now
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage["prompt_tokens"]
                    result.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                    result.output_tokens = usage["completion_tokens"]
        result.e2e_s = time.perf_counter() - start
        result.ok = result.output_tokens > 0
    except Exception as exc:  # a failed request is reported, never fatal to the run
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return result


def _message(text: str) -> str:
    """The message of an OpenAI error body, else the text itself (shortened)."""
    try:
        error = json.loads(text).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else text.strip()[:200]


def poisson_gaps(rate: float, seed: int) -> Iterator[float]:
    """Seconds between sends: Poisson arrivals at ``rate`` per second (no gap for ``inf``), seeded."""
    rng = np.random.default_rng(seed)
    while True:
        yield float(rng.exponential(1.0 / rate)) if rate != float("inf") else 0.0


def offered(rate: float, duration_s: float, seed: int = 0, num_prompts: int | None = None) -> int | None:
    """The requests ``run_load``'s schedule offers in ``duration_s`` (at most ``num_prompts``): what it
    sends when the server keeps up. None when unbounded (rate ``inf`` without ``num_prompts``)."""
    if rate == float("inf"):
        return num_prompts
    count, due_s = 0, 0.0
    for gap in poisson_gaps(rate, seed):
        if due_s >= duration_s or (num_prompts is not None and count >= num_prompts):
            break
        count += 1
        due_s += gap
    return count


async def wait_ready(session: Any, url: str, timeout_s: float = 120.0) -> None:
    """Wait until the server's ``/health`` answers 200 (it has workers), so timing starts warm;
    ``ConfigError`` naming the last answer after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            async with session.get(f"{url}/health", timeout=aiohttp_timeout(2.0)) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (TimeoutError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if time.monotonic() > deadline:
            raise ConfigError(
                f"{url}/health did not answer 200 within {timeout_s:g} s ({last}); is the "
                "server up at that URL?"
            )
        await asyncio.sleep(0.2)


def aiohttp_timeout(total_s: float) -> Any:
    import aiohttp

    return aiohttp.ClientTimeout(total=total_s)


async def run_load(
    url: str,
    trace: list[TraceRequest],
    *,
    rate: float,
    duration_s: float,
    max_concurrency: int,
    keys: dict[str, str],
    seed: int = 0,
    progress: Any = None,
    api_key: str | None = None,
    num_prompts: int | None = None,
) -> tuple[list[Result], float]:
    """Send the trace; returns the results and the wall time from first send to last answer.
    A request of a tenant in ``keys`` uses that key, any other ``api_key`` when given."""
    import aiohttp

    gaps = poisson_gaps(rate, seed)
    limit = asyncio.Semaphore(max_concurrency)
    tasks: list[asyncio.Task[Result]] = []
    url = url.rstrip("/")

    async def bounded(req: TraceRequest) -> Result:
        async with limit:
            key = keys.get(req.tenant, api_key)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            sent_s = time.perf_counter() - start
            result = await _one(session, url, req, headers)
            result.sent_s = sent_s
        if progress is not None:
            progress.update(1)
        return result

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await wait_ready(session, url, timeout_s=duration_s)
        start = time.perf_counter()
        i = 0
        while time.perf_counter() - start < duration_s and (num_prompts is None or i < num_prompts):
            await limit.acquire()  # bounded loop: never more than max_concurrency queued or running
            limit.release()
            tasks.append(asyncio.create_task(bounded(trace[i % len(trace)])))
            i += 1
            await asyncio.sleep(next(gaps))
        results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - start


def summarize(
    results: list[Result], duration_s: float, *, rate: float, max_concurrency: int, offered: int | None = None
) -> dict[str, Any]:
    """``vllm bench serve`` keys (ms, tokens/s) plus ``cached_tokens`` and ``cache_hit_rate``, and how
    many requests the schedule ``offered`` (``offered()``; None: unbounded), how many were ``sent``
    and the rate they went out at (``achieved_request_rate``: sends after the first over the time
    from the first send to the last)."""
    ok = [r for r in results if r.ok]
    last_sent_s = max((r.sent_s for r in results), default=0.0)
    out: dict[str, Any] = {
        "duration": duration_s,
        "offered": offered,
        "sent": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": sum(r.output_tokens for r in ok),
        "request_rate": rate if rate != float("inf") else "inf",
        "achieved_request_rate": (len(results) - 1) / last_sent_s if last_sent_s > 0 else 0.0,
        "max_concurrency": max_concurrency,
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
    }
    out["output_throughput"] = out["total_output_tokens"] / duration_s if duration_s else 0.0
    out["total_token_throughput"] = (out["total_input_tokens"] + out["total_output_tokens"]) / duration_s
    series = {
        "ttft": [r.ttft_s for r in ok],
        "tpot": [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [x for r in ok for x in r.itl_s],
        "e2el": [r.e2e_s for r in ok],
    }
    for name, values in series.items():
        arr = np.asarray(values, dtype=np.float64) * 1000.0 if values else np.zeros(1)
        out[f"mean_{name}_ms"] = float(arr.mean())
        out[f"median_{name}_ms"] = float(np.median(arr))
        out[f"std_{name}_ms"] = float(arr.std())
        out[f"p99_{name}_ms"] = float(np.percentile(arr, 99))
    out["cached_tokens"] = sum(r.cached_tokens for r in ok)
    total_in = out["total_input_tokens"]
    out["cache_hit_rate"] = out["cached_tokens"] / total_in if total_in else 0.0
    counts: dict[str, int] = {}
    for r in results:
        if not r.ok:
            counts[r.error or "no tokens"] = counts.get(r.error or "no tokens", 0) + 1
    out["errors"] = sorted(counts)
    out["error_counts"] = counts
    return out


SUMMARY_ROWS = (  # (label, summary key), in the order ``vllm bench serve`` prints them
    ("Requests offered (rate x duration)", "offered"),
    ("Requests sent", "sent"),
    ("Successful requests", "completed"),
    ("Failed requests", "failed"),
    ("Offered request rate (req/s)", "request_rate"),
    ("Achieved send rate (req/s)", "achieved_request_rate"),
    ("Benchmark duration (s)", "duration"),
    ("Total input tokens", "total_input_tokens"),
    ("Total generated tokens", "total_output_tokens"),
    ("Request throughput (req/s)", "request_throughput"),
    ("Output token throughput (tok/s)", "output_throughput"),
    ("Total token throughput (tok/s)", "total_token_throughput"),
    ("Mean TTFT (ms)", "mean_ttft_ms"),
    ("Median TTFT (ms)", "median_ttft_ms"),
    ("P99 TTFT (ms)", "p99_ttft_ms"),
    ("Mean TPOT (ms)", "mean_tpot_ms"),
    ("Mean ITL (ms)", "mean_itl_ms"),
    ("P99 ITL (ms)", "p99_itl_ms"),
    ("Mean E2EL (ms)", "mean_e2el_ms"),
    ("Cached prompt tokens", "cached_tokens"),
    ("Prefix cache hit rate", "cache_hit_rate"),
)


def _value_text(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else "unbounded" if value is None else str(value)


def table(summary: dict[str, Any]) -> str:
    """The summary as ``vllm bench serve`` prints it (a label and a value per line, between rules),
    then why fewer requests were sent than offered, and the commonest errors."""
    columns = (
        Column("", 0, align="<"),
        Column("", lambda r: _value_text(summary[r[1]])),
    )
    body = tables.plain(columns, SUMMARY_ROWS, header=False)
    width = max(len(line) for line in body.splitlines())
    lines = [f"{' Serving Benchmark Result ':=^{width}}", body, "=" * width]
    offered_, sent = summary["offered"], summary["sent"]
    if offered_ is not None and sent < offered_:
        lines.append(
            f"sent {sent} of {offered_} offered requests: the next request waits while "
            f"--max-concurrency {summary['max_concurrency']} are in flight, so a server that does "
            "not keep up with --rate is sent fewer; lower --rate to measure a load it serves"
        )
    ranked = sorted(summary.get("error_counts", {}).items(), key=lambda kv: -kv[1])
    for message, count in ranked[:5]:
        lines.append(f"failed x{count}: {message}")
    if len(ranked) > 5:
        lines.append(f"... and {len(ranked) - 5} other errors (see the JSON)")
    return "\n".join(lines)
