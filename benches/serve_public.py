"""Persistent agents through the ``openai`` client: a tool prompt declared public vs left private.

    .venv/bin/python benches/serve_public.py --model smollm2-135m --rounds 2

Each tenant (``--tenants``, default 4) runs one conversation of ``--turns`` turns: a system
message holding the same tool catalogue for every tenant (~600 tokens with SmolLM2's tokenizer),
then a first user message with the tenant's own document (~300 tokens) and a question, then one
more question per turn, each after the previous answer (greedy, ``--max-tokens`` per answer).
The tenants run concurrently, one client thread each, through ``openai.OpenAI`` streaming with
``include_usage``.

Two configurations of the same ``kvcache serve`` command: ``public`` declares the system message
in the config (``[[public_prefixes]]``), ``private`` does not. Rounds interleave them, each on a
fresh Redis and server; the public server is timed from when every worker acknowledged the
prefix (``GET /admin/public-prefixes``), so its one prefill of the catalogue is not in the
figures. Reported per configuration (medians over rounds): the reuse fraction (cached prompt
tokens / prompt tokens, from ``usage.prompt_tokens_details.cached_tokens``), requests per second
and the median TTFT, with the machine's load average, through ``kvcache.lab.serve_bench``'s summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from kvcache.lab import serve_bench as bench
from kvcache.lab import serving, tables
from kvcache.lab.tables import Column
from kvcache.redis_server import start_redis

ADMIN_KEY = "sk-bench-admin"
VOCABULARY = (
    "cache block tenant prefix router worker quota tier latency token model prompt answer ledger invoice "
    "shipment contract audit region revenue margin forecast supplier policy clause renewal budget variance "
    "account customer order warehouse delivery"
)
WORDS = VOCABULARY.split()
QUESTIONS = (
    "Which tool should I call first for this document?",
    "Summarize the document in one line.",
    "List two risks the document mentions.",
    "What should the next step be?",
    "Which numbers matter most here?",
    "Draft a short reply to the author.",
)


def tool_catalogue(num_tools: int = 12) -> str:
    """The public system message: an agent's tool catalogue (~50 tokens a tool)."""
    rng = random.Random(1)
    lines = ["You are an operations agent. Call tools by writing name(arguments). Available tools:"]
    for i in range(num_tools):
        words = " ".join(rng.choice(WORDS) for _ in range(28))
        lines.append(f"{i + 1}. tool_{i}(query: str, limit: int = 10): looks up {words}.")
    lines.append("Answer briefly and cite the tool you would use.")
    return "\n".join(lines)


def document(tenant: int, num_words: int = 300) -> str:
    """A tenant's private document (~300 tokens)."""
    rng = random.Random(1000 + tenant)
    return " ".join(rng.choice(WORDS) for _ in range(num_words)) + "."


def config_text(num_tenants: int, system: str | None) -> str:
    text = f'admin_keys = ["{ADMIN_KEY}"]\nmax_share = 1.0\n'
    if system is not None:
        text += f"[[public_prefixes]]\nsystem = {json.dumps(system)}\n"
    return text + "".join(f'[tenants.t{t}]\nkeys = ["sk-t{t}"]\n' for t in range(num_tenants))


def admin(url: str) -> dict[str, Any]:
    req = urllib.request.Request(
        url + "/admin/public-prefixes", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def wait_ready(url: str, workers: int, server: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    """The admin listing once every worker joined and applied the public prefixes (if any)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}; see its log")
        try:
            listing = admin(url)
            if len(listing["applied"]) == workers and all(listing["applied"].values()):
                return listing
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} was not ready within {timeout_s:g} s")


def converse(
    url: str,
    tenant: int,
    model: str,
    system: str,
    turns: int,
    max_tokens: int,
    results: list[bench.Result],
    start: float,
) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key=f"sk-t{tenant}", timeout=600, max_retries=0)
    messages: list[Any] = [{"role": "system", "content": system}]  # the client's message params
    for turn in range(turns):
        question = QUESTIONS[(tenant + turn) % len(QUESTIONS)]
        content = f"Document:\n{document(tenant)}\n\nQuestion: {question}" if turn == 0 else question
        messages.append({"role": "user", "content": content})
        sent = time.perf_counter()
        result = bench.Result(ok=False, sent_s=sent - start)
        text: list[str] = []
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if not text:
                    result.ttft_s = time.perf_counter() - sent
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.output_tokens = chunk.usage.completion_tokens
                details = chunk.usage.prompt_tokens_details
                result.cached_tokens = details.cached_tokens or 0 if details is not None else 0
        result.e2e_s = time.perf_counter() - sent
        result.ok = result.prompt_tokens > 0
        results.append(result)
        messages.append({"role": "assistant", "content": "".join(text)})


def run(args: argparse.Namespace, public: bool, logs: Path, round_: int) -> dict[str, Any]:
    system = tool_catalogue()
    name = "public" if public else "private"
    config = logs / f"serve_public_{name}.toml"
    config.write_text(config_text(args.tenants, system if public else None))
    redis = start_redis()
    port = serving.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = serving.serve_command(
        model=args.model,
        port=port,
        workers=args.workers,
        threads=args.threads,
        num_blocks=args.num_blocks,
        extra=("--config", str(config)),
    )
    log = open(logs / f"serve_public_{name}_{round_}.log", "wb")  # noqa: SIM115
    env = {**os.environ, "KVCACHE_REDIS_URL": redis.url}  # a password: never argv
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        listing = wait_ready(url, args.workers, server, args.startup_timeout)
        results: list[bench.Result] = []
        start = time.perf_counter()
        conversation = (args.model, system, args.turns, args.max_tokens, results, start)
        threads = [
            threading.Thread(target=converse, args=(url, t, *conversation)) for t in range(args.tenants)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall_s = time.perf_counter() - start
        summary = bench.summarize(results, wall_s, rate=float("inf"), max_concurrency=args.tenants)
        summary["public_tokens"] = sum(p["num_tokens"] for p in listing["data"])
        summary["first_turn_cached"] = [
            r.cached_tokens for r in sorted(results, key=lambda r: r.sent_s)[: args.tenants]
        ]
        summary["load_avg"] = os.getloadavg()[0]
        return summary
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
        redis.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--num-blocks", type=int, default=1024)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of private then public")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--logs", default="/tmp/serve_public")
    parser.add_argument("--out", default="serve_public.json")
    args = parser.parse_args()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rounds: list[dict[str, dict[str, Any]]] = []
    for round_ in range(args.rounds):
        results = {}
        for public in (False, True):
            name = "public" if public else "private"
            results[name] = s = run(args, public, logs, round_)
            print(
                f"round {round_} {name}: reuse {s['cache_hit_rate']:.3f}, "
                f"{s['request_throughput']:.3f} req/s, "
                f"median TTFT {s['median_ttft_ms']:.0f} ms, first turns cached {s['first_turn_cached']}, "
                f"load {s['load_avg']:.2f}",
                flush=True,
            )
        rounds.append(results)
    keys = (
        "cache_hit_rate",
        "request_throughput",
        "median_ttft_ms",
        "total_input_tokens",
        "cached_tokens",
        "completed",
        "public_tokens",
    )
    medians = {
        name: {key: statistics.median(r[name][key] for r in rounds) for key in keys}
        for name in ("private", "public")
    }
    print(
        f"\nmodel {args.model}, {args.workers} worker(s) x {args.threads} threads, {args.tenants} tenants x "
        f"{args.turns} turns, {args.max_tokens} tokens per answer; "
        f"medians of {args.rounds} interleaved rounds"
    )
    columns = (  # one row per tool prompt: (private or public, its medians)
        Column("tool prompt", 0, align="<"),
        Column("reuse", lambda r: r[1]["cache_hit_rate"], ".3f"),
        Column("req/s", lambda r: r[1]["request_throughput"], ".3f"),
        Column("TTFT ms", lambda r: r[1]["median_ttft_ms"], ".0f"),
        Column("prompt tok", lambda r: r[1]["total_input_tokens"], ".0f"),
        Column("cached tok", lambda r: r[1]["cached_tokens"], ".0f"),
    )
    print(tables.plain(columns, medians.items()))
    print(f"load average (1 min) before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    report = {
        "args": vars(args),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "rounds": rounds,
        "medians": medians,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
