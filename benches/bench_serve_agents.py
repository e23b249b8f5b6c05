"""Persistent-context agents served end to end: sharing on, sharing impossible, ``transformers serve``.

    .venv/bin/python -u benches/bench_serve_agents.py --shape both --quick --rounds 1   # a few minutes
    .venv/bin/python -u benches/bench_serve_agents.py --shape long --rounds 3
    .venv/bin/python -u benches/bench_serve_agents.py --shape long --tenants 2 --rounds 5 \
        --contenders sharing,public,no-sharing       # half the requests, the same share per tenant
    .venv/bin/pytest benches/bench_serve_agents.py --benchmark-only   # the quick short shape, kvcache only

The benchmark starts every contender itself on the same weights (``--model``, default the registry's
``smollm2-135m``, whose converted folder ``transformers serve`` loads), the same device and dtype
(``--device cpu --dtype float32``) and the same threads (``--threads``: torch threads and
``OMP_NUM_THREADS``), all three up at once:

- ``sharing``: ``kvcache serve`` with its defaults, one API key per tenant (only ``--num-blocks``, so
  the pool holds the longest prompts, and ``--read-timeout``, so a first token may take minutes);
- ``no-sharing``: the same command, but every request comes with its own API key of its own
  tenant, so no request can reuse another's blocks (the scope enters every block key); the prompts,
  the order and everything else are the same;
- ``transformers``: ``transformers serve --continuous-batching`` (needs ``transformers[serving]``,
  pyproject's ``bench-serve`` extra), which shares prefixes between requests too but has no tenants;
  its KV cache gets the same capacity in tokens as kvcache's pool (``--cb-num-blocks``);
- ``public`` (only when named in ``--contenders``): ``sharing``, with each round's system prompt
  declared a public prefix (``POST /admin/public-prefixes``) before the round, timed once every
  worker applied and prefilled it, so each tenant's first request reuses that one copy.

Every request goes through the official ``openai`` client to ``/v1/completions`` (text prompts:
``transformers serve`` takes no token ids), greedy, streaming with usage, in a closed loop of
``--concurrency`` clients (4). The workload is ``kvcache.lab.workloads.persistent_agents``: per request a
public system prompt of tool descriptions, the tenant's private document, the session's history and
a question. Shapes (tokens are SmolLM2's, about 1.3 per word):

- ``short``: 4 tenants x 3 sessions x 4 turns; system ~600 tokens, document ~300, question ~30,
  history answers ~32; ``max_tokens`` 32. ``--quick``: 2 tenants x 2 sessions x 3 turns;
- ``long``: 4 tenants x 2 sessions x 3 turns; system ~1.5k tokens, documents 1.3k-5.9k (prompts
  3.2k-6.6k in the first two rounds' draws), answers (tool calls) of 16 tokens. ``--quick``:
  2 tenants x 2 sessions x 2 turns, system ~1k, documents 1k-3.3k (prompts 2.2k-3.9k).

Each round draws fresh texts (seed + round), so no round profits from an earlier one, and runs the
contenders one after another in a rotated order, so a neighbour's burst of load hits them alike.
Per contender it reports the medians over rounds of wall time, requests/s, TTFT p50 and p99 and the
cached fraction of prompt tokens (``usage.prompt_tokens_details.cached_tokens``; ``transformers
serve`` does not report it: n/a), the load average before and after, and the ratios: sharing on over
sharing impossible (requests/s), kvcache over ``transformers serve`` (requests/s, TTFT p50 and p99).
``--out`` writes every round as JSON; server logs go to ``--logs``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvcache.cache.config import DEFAULT_BLOCK_SIZE
from kvcache.child import python_argv
from kvcache.lab import serve_bench as bench
from kvcache.lab import serving as own_server
from kvcache.lab import tables
from kvcache.lab.tables import Column
from kvcache.lab.trace import TraceRequest, prompt_text
from kvcache.lab.workloads import persistent_agents
from kvcache.model import registry as models

CONTENDERS = ("sharing", "no-sharing", "transformers")
# ``public``: sharing on, with each round's system prompt (the tool catalogue every tenant's prompt
# opens with) declared a public prefix through the admin endpoint before the round, so every
# tenant reuses one copy of it; not run unless named in ``--contenders``.
OPTIONAL = ("public",)
ADMIN_KEY = "sk-bench-admin"


@dataclass(frozen=True, slots=True)
class Shape:
    tenants: int
    sessions: int
    turns: int
    system_words: int
    document_words: tuple[int, int]
    question_words: int
    answer_words: int
    max_tokens: int

    def requests(self, seed: int) -> list[TraceRequest]:
        return persistent_agents(
            num_tenants=self.tenants,
            sessions_per_tenant=self.sessions,
            turns=self.turns,
            system_words=self.system_words,
            document_words=self.document_words,
            question_words=self.question_words,
            answer_words=self.answer_words,
            output_tokens=self.max_tokens,
            seed=seed,
        )


SHAPES = {
    ("short", False): Shape(4, 3, 4, 400, (230, 230), 22, 24, 32),
    ("short", True): Shape(2, 2, 3, 400, (230, 230), 22, 24, 32),
    ("long", False): Shape(4, 2, 3, 1000, (1000, 4500), 22, 10, 16),
    ("long", True): Shape(2, 2, 2, 650, (800, 2500), 22, 10, 16),
}


@dataclass(slots=True)
class Server:
    name: str
    url: str
    model: str  # what requests send as ``model``
    process: subprocess.Popen[bytes]
    log_path: Path
    keys: Callable[[int, int, TraceRequest], str]  # (round, index in the round, request) -> API key


def tenant_config(tenants: int, rounds: int, requests_per_round: int) -> str:
    """The ``--config`` both kvcache contenders load: a key per tenant of the workload (``sk-tenantN``)
    and a key of its own tenant for every request of rounds 0 (the warm-up) to ``rounds``
    (``sk-r{round}-{index}``)."""
    lines = [f'admin_keys = ["{ADMIN_KEY}"]\n']
    lines += [f'[tenants.tenant{t}]\nkeys = ["sk-tenant{t}"]\n' for t in range(tenants)]
    for r in range(rounds + 1):
        lines += [f'[tenants.r{r}-{i}]\nkeys = ["sk-r{r}-{i}"]\n' for i in range(requests_per_round)]
    return "".join(lines)


def num_blocks_for(
    requests: list[TraceRequest], concurrency: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> int:
    """A pool that holds ``concurrency`` of the longest prompts twice over (a prompt is at most one
    token per 3 characters), in multiples of 1024 blocks, at least serve's default 1024."""
    longest = max(len(prompt_text(r)) // 3 + r.output_tokens for r in requests)
    blocks = 2 * concurrency * longest // block_size
    return max(1024, -(-blocks // 1024) * 1024)


def start_servers(args: argparse.Namespace, config_path: Path, num_blocks: int) -> dict[str, Server]:
    env = own_server.own_deployment_env()
    env["OMP_NUM_THREADS"] = str(args.threads)
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    servers: dict[str, Server] = {}
    for name in args.contenders:
        port = own_server.free_port()
        log_path = Path(args.logs) / f"serve-agents-{name}.log"
        if name == "transformers":
            folder = str(models.prepare(args.model)) if args.model in models.REGISTRY else args.model
            # ``-P``: the working directory's kernels/ must not shadow Hugging Face's kernels package.
            cmd = [
                *python_argv("-m", "transformers.cli.transformers"),
                "serve",
                "--continuous-batching",
                "--device",
                args.device,
                "--dtype",
                args.dtype,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                # The same KV capacity as kvcache's pool, in its pages of 256 tokens: left unset, it
                # takes 90% of the free memory (of the machine, on a CPU).
                "--cb-num-blocks",
                str(max(1, num_blocks * 16 // 256)),
                *shlex.split(args.transformers_args),
                folder,
            ]
            model, keys = folder, _no_key
        else:
            # Long prompts queued on a loaded CPU wait minutes for their first token; the default
            # 60 s read timeout would turn them into 504s (transformers serve has no such limit).
            extra = ("--device", args.device, "--dtype", args.dtype, "--config", str(config_path))
            cmd = own_server.serve_command(
                model=args.model,
                port=port,
                workers=1,
                threads=args.threads,
                num_blocks=num_blocks,
                extra=(*extra, "--read-timeout", "1800"),
            )
            model, keys = args.model, (_request_key if name == "no-sharing" else _tenant_key)
        with log_path.open("wb") as log:
            # A session of its own: a server that will not stop is killed with its workers.
            process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        servers[name] = Server(name, f"http://127.0.0.1:{port}", model, process, log_path, keys)
    return servers


def _no_key(round_: int, index: int, req: TraceRequest) -> str:
    return "none"


def _tenant_key(round_: int, index: int, req: TraceRequest) -> str:
    return f"sk-{req.tenant}"


def _request_key(round_: int, index: int, req: TraceRequest) -> str:
    return f"sk-r{round_}-{index}"


def wait_ready(server: Server, timeout_s: float = 600.0) -> None:
    """Until ``/health`` answers 200; ``SystemExit`` with the log's end if the server exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise SystemExit(
                f"{server.name}: the server exited with code {server.process.returncode} before "
                f"it was ready; {server.log_path} ends:\n" + "\n".join(tail)
            )
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{server.name}: {server.url}/health did not answer 200 in {timeout_s:g} s")


def system_prompt(requests: list[TraceRequest]) -> str:
    """The system prompt every request of a round opens with: ``persistent_agents`` puts it before
    the first blank line."""
    return prompt_text(requests[0]).split("\n\n", 1)[0]


def publish(server: Server, text: str, timeout_s: float = 600.0) -> None:
    """Declare ``text`` a public prefix (``POST /admin/public-prefixes``), then wait until every
    worker applied it (and prefilled it), so the round that follows is timed without that."""

    def call(method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            server.url + "/admin/public-prefixes",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    call("POST", {"text": text})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        applied = call("GET")["applied"]
        if applied and all(applied.values()):
            return
        time.sleep(0.5)
    raise SystemExit(f"{server.name}: the public prefix was not applied by every worker in {timeout_s:g} s")


def stop_servers(servers: dict[str, Server]) -> None:
    """SIGTERM each server, then SIGKILL whatever of its session is still there after 60 s or after
    it exited (a worker busy in a long prefill may outlive its server)."""
    for server in servers.values():
        server.process.terminate()
    for server in servers.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


async def one_request(client: Any, model: str, req: TraceRequest) -> tuple[bench.Result, bool]:
    """One streamed completion; the result and whether the server reported ``cached_tokens``."""
    result = bench.Result(ok=False)
    reported = False
    start = last = time.perf_counter()
    try:
        stream = await client.completions.create(
            model=model,
            prompt=prompt_text(req),
            max_tokens=req.output_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                if result.output_tokens == 0:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                result.output_tokens += 1
                last = now
            if chunk.usage is not None:
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.output_tokens = chunk.usage.completion_tokens
                details = chunk.usage.prompt_tokens_details
                if details is not None and details.cached_tokens is not None:
                    result.cached_tokens, reported = details.cached_tokens, True
        result.e2e_s = time.perf_counter() - start
        result.ok = result.output_tokens > 0
    except Exception as exc:  # a failed request is reported, never fatal to the run
        result.error = f"{type(exc).__name__}: {exc}"
    return result, reported


async def run_round(
    server: Server, requests: list[TraceRequest], round_: int, concurrency: int
) -> tuple[list[bench.Result], float, bool]:
    """The requests in order through ``concurrency`` closed-loop clients; the results (in request
    order), the wall time from the first send to the last answer, and whether cached tokens were
    reported."""
    import openai

    results: list[bench.Result | None] = [None] * len(requests)
    reported = False
    todo = iter(enumerate(requests))
    clients: dict[str, Any] = {}

    async def client_loop() -> None:
        nonlocal reported
        for index, req in todo:
            key = server.keys(round_, index, req)
            if key not in clients:
                clients[key] = openai.AsyncOpenAI(
                    base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=1800.0
                )
            result, got = await one_request(clients[key], server.model, req)
            result.sent_s = time.perf_counter() - start
            results[index] = result
            reported = reported or got

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall_s = time.perf_counter() - start
    for client in clients.values():
        await client.close()
    return [r for r in results if r is not None], wall_s, reported


def round_figures(
    results: list[bench.Result], wall_s: float, reported: bool, concurrency: int, load: tuple[float, float]
) -> dict[str, Any]:
    """One contender's round: ``bench.summarize``'s figures under the names the table shows."""
    s = bench.summarize(results, wall_s, rate=float("inf"), max_concurrency=concurrency)
    ok = [r for r in results if r.ok]
    # Where a request's time goes: waiting and prefill (to the first token) against decoding.
    ttft_share = sum(r.ttft_s for r in ok) / max(1e-9, sum(r.e2e_s for r in ok))
    return {
        "tpot_ms": s["median_tpot_ms"],
        "ttft_share": ttft_share,
        "wall_s": wall_s,
        "req_s": s["request_throughput"],
        "ttft_p50_s": s["median_ttft_ms"] / 1e3,
        "ttft_p99_s": s["p99_ttft_ms"] / 1e3,
        "cached": s["cache_hit_rate"] if reported else None,
        "prompt_tokens": s["total_input_tokens"] / max(1, s["completed"]),
        "output_tokens": s["total_output_tokens"],
        "completed": s["completed"],
        "failed": s["failed"],
        "errors": s["errors"],
        "load_before": load[0],
        "load_after": load[1],
    }


def medians(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per contender, the median of each figure over the rounds (None where never reported)."""
    out: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        rows = [r[name] for r in rounds if name in r]
        figures: dict[str, Any] = {"rounds": len(rows)}
        for key in (
            "wall_s",
            "req_s",
            "ttft_p50_s",
            "ttft_p99_s",
            "tpot_ms",
            "ttft_share",
            "cached",
            "prompt_tokens",
            "output_tokens",
            "completed",
            "failed",
            "load_before",
            "load_after",
        ):
            values = [row[key] for row in rows if row[key] is not None]
            figures[key] = statistics.median(values) if values else None
        out[name] = figures
    return out


def ratios(m: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Sharing on over impossible (req/s); kvcache over ``transformers serve`` (req/s; TTFT as the
    peer's over ours, so above 1 is better for kvcache too)."""
    out: dict[str, float] = {}
    on, off, peer = m.get("sharing"), m.get("no-sharing"), m.get("transformers")
    if on and off and off["req_s"]:
        out["sharing_over_no_sharing_req_s"] = on["req_s"] / off["req_s"]
    public = m.get("public")
    if public and off and off["req_s"]:
        out["public_over_no_sharing_req_s"] = public["req_s"] / off["req_s"]
    if on and peer and peer["req_s"]:
        out["kvcache_over_transformers_req_s"] = on["req_s"] / peer["req_s"]
        for key in ("ttft_p50_s", "ttft_p99_s"):
            if on[key]:
                out[f"transformers_over_kvcache_{key}"] = peer[key] / on[key]
    return out


CONTENDER_NAMES = {  # a contender's key in the figures -> how the table names it
    "sharing": "`kvcache serve`, defaults (sharing on)",
    "public": "`kvcache serve`, sharing on, system prompt declared public",
    "no-sharing": "`kvcache serve`, sharing impossible (a key and tenant per request)",
    "transformers": "`transformers serve --continuous-batching`",
}
TABLE_COLUMNS = (  # one row per contender: (key, its medians)
    Column("contender", lambda r: CONTENDER_NAMES.get(r[0], r[0]), align="<"),
    Column("wall s", lambda r: r[1]["wall_s"], ".0f"),
    Column("req/s", lambda r: r[1]["req_s"], ".3f"),
    Column("TTFT p50 s", lambda r: r[1]["ttft_p50_s"], ".2f"),
    Column("TTFT p99 s", lambda r: r[1]["ttft_p99_s"], ".2f"),
    Column("TPOT ms", lambda r: r[1]["tpot_ms"], ".0f"),
    Column("TTFT share", lambda r: f"{100 * r[1]['ttft_share']:.0f}%"),
    Column("cached", lambda r: "n/a" if r[1]["cached"] is None else f"{100 * r[1]['cached']:.1f}%"),
    Column("prompt tokens", lambda r: r[1]["prompt_tokens"], ".0f"),
    Column("load", lambda r: f"{r[1]['load_before']:.1f}-{r[1]['load_after']:.1f}"),
)


def table(m: dict[str, dict[str, Any]]) -> list[str]:
    """The Markdown table README.md and docs/serve.md show."""
    return tables.markdown(TABLE_COLUMNS, m.items()).splitlines()


def run_shape(
    servers: dict[str, Server], shape_name: str, shape: Shape, args: argparse.Namespace, first_round: int
) -> dict[str, Any]:
    """``args.rounds`` rounds numbered from ``first_round``: the number picks the texts (seed) and
    the per-request keys, so no two rounds of any shape share a prompt or a key."""
    rounds: list[dict[str, dict[str, Any]]] = []
    names = list(servers)
    for r in range(args.rounds):
        number = first_round + r
        requests = shape.requests(seed=args.seed + 1000 * number)
        order = names[r % len(names) :] + names[: r % len(names)]
        this: dict[str, dict[str, Any]] = {}
        for name in order:
            if name == "public":
                publish(servers[name], system_prompt(requests))
            before = os.getloadavg()[0]
            load = run_round(servers[name], requests, number, args.concurrency)
            results, wall_s, reported = asyncio.run(load)
            after = os.getloadavg()[0]
            f = this[name] = round_figures(results, wall_s, reported, args.concurrency, (before, after))
            cached = "n/a" if f["cached"] is None else f"{100 * f['cached']:.1f}%"
            print(
                f"{shape_name} round {r} {name:12s} wall {wall_s:6.1f} s  {f['req_s']:.3f} req/s  "
                f"TTFT p50 {f['ttft_p50_s']:.2f} s p99 {f['ttft_p99_s']:.2f} s  cached {cached}  "
                f"failed {f['failed']}  load {f['load_before']:.2f}->{f['load_after']:.2f}",
                flush=True,
            )
            for error in f["errors"][:3]:
                print(f"    failed: {error}", flush=True)
        rounds.append({name: this[name] for name in names})
    m = medians(rounds)
    return {"shape": dataclasses.asdict(shape), "rounds": rounds, "medians": m, "ratios": ratios(m)}


def warm_up(servers: dict[str, Server], concurrency: int) -> None:
    """One short request each (round 0's keys), so no round pays for a first forward or a first load."""
    requests = Shape(1, 1, 1, 32, (16, 16), 8, 4, 4).requests(seed=0)
    for server in servers.values():
        asyncio.run(run_round(server, requests, 0, concurrency))


@contextmanager
def serving(
    args: argparse.Namespace, requests_per_round: int, tenants: int, num_blocks: int, total_rounds: int
) -> Iterator[dict[str, Server]]:
    config_path = Path(args.logs) / "serve-agents.toml"
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    config_path.write_text(tenant_config(tenants, total_rounds, requests_per_round))
    servers = start_servers(args, config_path, num_blocks)
    try:
        for server in servers.values():
            wait_ready(server)
        warm_up(servers, args.concurrency)
        yield servers
    finally:
        stop_servers(servers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--shape", choices=["short", "long", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="the small version of each shape")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS + OPTIONAL)}",
    )
    parser.add_argument("--model", default=models.DEFAULT_MODEL, help="registry name or a folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and OMP_NUM_THREADS per server")
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop clients")
    parser.add_argument(
        "--transformers-args",
        default="",
        metavar="ARGS",
        help="more transformers serve options: '--cb-max-memory-percent 0.2'",
    )
    parser.add_argument(
        "--tenants",
        type=int,
        help="tenants of each shape instead of its own (each tenant keeps its sessions and turns, so the "
        "share of every tenant's prompts that can be reused stays; fewer tenants, shorter rounds)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logs", default="/tmp/serve-agents")
    parser.add_argument("--out", default="serve_agents.json")
    args = parser.parse_args(argv)
    # SIGTERM (a timeout, a kill) unwinds like Ctrl-C, so the servers this run started are stopped
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    args.contenders = [c for c in args.contenders.split(",") if c]
    unknown = sorted(set(args.contenders) - set(CONTENDERS + OPTIONAL))
    if unknown or args.rounds < 1:
        parser.error(
            f"--contenders {unknown}: use {CONTENDERS + OPTIONAL}" if unknown else "--rounds must be >= 1"
        )
    if args.tenants is not None and args.tenants < 1:
        parser.error(f"--tenants {args.tenants} must be >= 1")
    shapes = ["short", "long"] if args.shape == "both" else [args.shape]
    plan = {name: SHAPES[(name, args.quick)] for name in shapes}
    if args.tenants is not None:
        plan = {name: dataclasses.replace(shape, tenants=args.tenants) for name, shape in plan.items()}
    requests = {name: shape.requests(seed=args.seed) for name, shape in plan.items()}
    most = max(len(r) for r in requests.values())
    tenants = max(shape.tenants for shape in plan.values())
    num_blocks = max(num_blocks_for(r, args.concurrency) for r in requests.values())
    load_start = os.getloadavg()
    print(
        f"contenders {args.contenders}; model {args.model}, {args.device} {args.dtype}, "
        f"{args.threads} threads; kvcache --num-blocks {num_blocks}; load average "
        f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} on {os.cpu_count()} cpus",
        flush=True,
    )
    report: dict[str, Any] = {"args": vars(args), "num_blocks": num_blocks, "load_start": load_start}
    with serving(args, most, tenants, num_blocks, len(plan) * args.rounds) as servers:
        ready = os.getloadavg()
        print(f"servers ready, load average {ready[0]:.2f}", flush=True)
        for i, (name, shape) in enumerate(plan.items()):
            report[name] = run_shape(servers, name, shape, args, first_round=1 + i * args.rounds)
    report["load_end"] = os.getloadavg()
    command = "benches/bench_serve_agents.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in plan:
        m, q = report[name]["medians"], report[name]["ratios"]
        print(
            f"\n{name} shape{' (quick)' if args.quick else ''}: medians of {args.rounds} rounds; "
            f"`{command}`; load average {load_start[0]:.2f} at start, "
            f"{report['load_end'][0]:.2f} at end"
        )
        print("\n".join(table(m)))
        for key, value in q.items():
            print(f"{key}: {value:.2f}x")
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


# ---- pytest-benchmark: the quick short shape, sharing on against impossible --------------------


def _bench_args() -> argparse.Namespace:
    return argparse.Namespace(
        contenders=["sharing", "no-sharing"],
        model=os.environ.get("BENCH_SERVE_AGENTS_MODEL", models.DEFAULT_MODEL),
        device="cpu",
        dtype="float32",
        threads=2,
        concurrency=4,
        rounds=8,
        seed=0,
        transformers_args="",
        logs=os.environ.get("BENCH_SERVE_AGENTS_LOGS", "/tmp/serve-agents"),
    )


def _bench_servers() -> Iterator[dict[str, Server]]:
    shape = SHAPES[("short", True)]
    requests = shape.requests(seed=0)
    args = _bench_args()
    num_blocks = num_blocks_for(requests, args.concurrency)
    with serving(args, len(requests), shape.tenants, num_blocks, args.rounds) as servers:
        yield servers


def _bench_round(benchmark: Any, server: Server) -> None:
    shape = SHAPES[("short", True)]
    calls = iter(range(1, 9))

    def once() -> None:
        r = next(calls)  # fresh texts and keys each call: no call profits from an earlier one
        results, _, _ = asyncio.run(run_round(server, shape.requests(seed=1000 * r), r, 4))
        assert all(x.ok for x in results), [x.error for x in results if not x.ok]

    benchmark.extra_info["requests"] = len(shape.requests(seed=0))
    benchmark.pedantic(once, rounds=3, iterations=1)


@pytest.fixture(scope="module")
def agent_servers() -> Iterator[dict[str, Server]]:
    yield from _bench_servers()


@pytest.mark.benchmark(group="serve agents, short quick shape")
def test_serve_agents_baseline_sharing_impossible(benchmark: Any, agent_servers: dict[str, Server]) -> None:
    _bench_round(benchmark, agent_servers["no-sharing"])


@pytest.mark.benchmark(group="serve agents, short quick shape")
def test_serve_agents_sharing_on(benchmark: Any, agent_servers: dict[str, Server]) -> None:
    _bench_round(benchmark, agent_servers["sharing"])


if __name__ == "__main__":
    sys.exit(main())
