"""Side by side on one server binary: routing ``affinity`` vs ``round_robin`` and ``least_loaded``,
pod tier on vs off.

    .venv/bin/python benches/serve_compare.py --workers 2 --duration 20 --rate 4

For each configuration it starts a fresh Redis and ``kvcache serve`` (same command, different
flags), waits for every worker, replays the same trace with ``bench-serve``'s loop, reads the
server's per-tier prefix-cache counters, and stops it. Then it prints one table and the ratios
(TTFT and throughput of affinity over round_robin, pod tier on over off), the machine's load
average beside them, and writes the JSON (``--out``) and a bar chart (``--plot``).

It also probes isolation on the first configuration: tenant B sends tenant A's cached prompts
and fresh prompts of the same length; B's TTFT on A's prompts should look like a miss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from kvcache.lab import serve_bench as bench
from kvcache.lab import serving, tables
from kvcache.lab.tables import Column
from kvcache.lab.trace import TraceRequest, token_request
from kvcache.redis_server import start_redis

DEFAULT_TRACE = "synthetic:tenants=4,sessions=8,turns=5,system=256,user=64,output=16"
CONFIGS = [
    ("affinity", True),
    ("round_robin", True),
    ("least_loaded", True),
    ("affinity", False),
    ("round_robin", False),
    ("least_loaded", False),
]


def _metrics(url: str) -> dict[str, float]:
    """From the server's /metrics: prefix-cache tokens per tier (``queries:device``, ``hits:pod``,
    ...), requests per worker (``requests:w0``), and the mean engine queue time (``queue_ms``)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    queue_sum = queue_count = 0.0
    for line in text.splitlines():
        value = float(line.rsplit(" ", 1)[1]) if not line.startswith("#") else 0.0
        for kind in ("queries", "hits"):
            if line.startswith(f"kvcache:prefix_cache_{kind}_total{{"):
                tier = line.split('tier="', 1)[1].split('"', 1)[0]
                out[f"{kind}:{tier}"] = out.get(f"{kind}:{tier}", 0.0) + value
        if line.startswith("kvcache:request_queue_time_seconds_sum{"):
            queue_sum += value
        elif line.startswith("kvcache:request_queue_time_seconds_count{"):
            queue_count += value
            worker = line.split('worker="', 1)[1].split('"', 1)[0]
            out[f"requests:{worker}"] = value
    out["queue_ms"] = 1e3 * queue_sum / queue_count if queue_count else 0.0
    return out


def _config_text(num_tenants: int) -> str:
    return "".join(f'[tenants.tenant{t}]\nkeys = ["sk-tenant{t}"]\n' for t in range(num_tenants))


async def _isolation_probe(url: str, num_probes: int, prompt_tokens: int) -> dict[str, float]:
    """Median TTFT (ms) of tenant1 on tenant0's cached prompts, on fresh prompts, and of tenant0's hits."""
    import aiohttp

    rng = random.Random(7)
    probe, miss, hit = [], [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(num_probes):
            secret = [rng.randrange(1, 256) for _ in range(prompt_tokens)]
            fresh = [rng.randrange(1, 256) for _ in range(prompt_tokens)]
            a = {"Authorization": "Bearer sk-tenant0"}
            b = {"Authorization": "Bearer sk-tenant1"}
            await bench._one(session, url, token_request(secret, 1), a)
            await asyncio.sleep(0.3)  # the router learns tenant0's blocks
            r_probe = await bench._one(session, url, token_request(secret, 1), b)
            r_miss = await bench._one(session, url, token_request(fresh, 1), b)
            r_hit = await bench._one(session, url, token_request(secret, 1), a)
            assert r_probe.cached_tokens == 0, "isolation broken: tenant1 hit tenant0's blocks"
            probe.append(r_probe.ttft_s * 1e3)
            miss.append(r_miss.ttft_s * 1e3)
            hit.append(r_hit.ttft_s * 1e3)
    return {
        "probe_ttft_ms": statistics.median(probe),
        "miss_ttft_ms": statistics.median(miss),
        "hit_ttft_ms": statistics.median(hit),
    }


def run_config(
    args: argparse.Namespace,
    policy: str,
    pod: bool,
    trace: list[TraceRequest],
    keys: dict[str, str],
    config_path: Path,
    probe: bool,
) -> dict[str, Any]:
    redis = start_redis()
    port = serving.free_port()
    url = f"http://127.0.0.1:{port}"
    extra = ("--policy", policy, "--config", str(config_path))
    cmd = serving.serve_command(
        model=args.model,
        port=port,
        workers=args.workers,
        threads=args.threads,
        num_blocks=args.num_blocks,
        extra=extra,
    )
    if not pod:
        cmd.append("--no-pod-tier")
    log = open(Path(args.logs) / f"serve-{policy}-{'pod' if pod else 'nopod'}.log", "wb")  # noqa: SIM115
    env = {**os.environ, "KVCACHE_REDIS_URL": redis.url}  # a password: never argv
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        results, wall_s = asyncio.run(
            bench.run_load(
                url,
                trace,
                rate=args.rate,
                duration_s=args.duration,
                max_concurrency=args.max_concurrency,
                keys=keys,
                seed=args.seed,
            )
        )
        summary = bench.summarize(results, wall_s, rate=args.rate, max_concurrency=args.max_concurrency)
        summary["tiers"] = _metrics(url)
        if probe:
            summary["isolation"] = asyncio.run(_isolation_probe(url, args.probes, args.probe_tokens))
        return summary
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        redis.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--num-blocks", type=int, default=256)
    parser.add_argument("--trace", default=DEFAULT_TRACE)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--probe-tokens", type=int, default=192)
    parser.add_argument("--only", help="comma-separated subset, e.g. affinity:pod,round_robin:pod")
    parser.add_argument("--repeat", type=int, default=1, help="run the configurations this many rounds")
    parser.add_argument("--logs", default="/tmp")
    parser.add_argument("--out", default="serve_compare.json")
    parser.add_argument("--plot", default="serve_compare.png")
    args = parser.parse_args()

    trace = bench.load_trace(args.trace, vocab_size=256)
    tenants = sorted({r.tenant for r in trace if r.tenant is not None}) or ["tenant0"]
    num_tenants = max(2, len(tenants))
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    config_path = Path(args.logs) / "serve_compare.toml"
    config_path.write_text(_config_text(num_tenants))
    keys = {f"tenant{t}": f"sk-tenant{t}" for t in range(num_tenants)}
    configs = CONFIGS
    if args.only:
        wanted = set(args.only.split(","))
        configs = [c for c in CONFIGS if f"{c[0]}:{'pod' if c[1] else 'nopod'}" in wanted]
    rounds: list[dict[str, dict[str, Any]]] = []
    load_before = os.getloadavg()
    # Rounds interleave the configurations, so a neighbour's burst of load hits them all alike.
    for round_ in range(args.repeat):
        results: dict[str, dict[str, Any]] = {}
        for i, (policy, pod) in enumerate(configs):
            name = f"{policy}:{'pod' if pod else 'nopod'}"
            started = time.monotonic()
            probe = i == 0 and round_ == 0
            results[name] = run_config(args, policy, pod, trace, keys, config_path, probe=probe)
            took, load = time.monotonic() - started, os.getloadavg()[0]
            print(f"round {round_} {name}: done in {took:.0f}s, load {load:.2f}", flush=True)
        rounds.append(results)
        print(_table(results))
    ratios = [_ratios(r) for r in rounds]
    summary = {k: statistics.geometric_mean([r[k] for r in ratios]) for k in ratios[0]}
    report = {
        "args": vars(args),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "rounds": rounds,
        "ratios_per_round": ratios,
        "ratios": summary,
    }
    sent = max(s["completed"] + s["failed"] for r in rounds for s in r.values())
    if sent > len(trace):
        print(f"note: {sent} requests from a {len(trace)}-request trace: it wrapped, repeats are hits")
    print(json.dumps({k: [round(r[k], 3) for r in ratios] for k in summary}, indent=1))
    print("geometric mean over rounds:", json.dumps({k: round(v, 3) for k, v in summary.items()}, indent=1))
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (1 min)")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    _plot(rounds[0], args.plot)
    return 0


def _ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    pairs = [
        ("affinity_over_round_robin", "affinity:{p}", "round_robin:{p}"),
        ("least_loaded_over_round_robin", "least_loaded:{p}", "round_robin:{p}"),
        ("pod_on_over_off", "{r}:pod", "{r}:nopod"),
    ]
    for label, num, den in pairs:
        for fill in ("pod", "nopod") if "{p}" in num else ("affinity", "round_robin", "least_loaded"):
            key = {"p": fill, "r": fill}
            a, b = results.get(num.format(**key)), results.get(den.format(**key))
            if a is None or b is None:
                continue
            suffix = f"{label}[{fill}]"
            out[f"mean_ttft {suffix}"] = a["mean_ttft_ms"] / b["mean_ttft_ms"]
            out[f"p99_ttft {suffix}"] = a["p99_ttft_ms"] / b["p99_ttft_ms"]
            out[f"output_throughput {suffix}"] = a["output_throughput"] / b["output_throughput"]
    return out


def _pod_share(s: dict[str, Any]) -> float:
    """Device-pool queries answered by the pod tier."""
    t = s["tiers"]
    return t.get("hits:pod", 0.0) / t["queries:device"] if t.get("queries:device") else 0.0


def _max_share(s: dict[str, Any]) -> float:
    """The busiest worker's share of the requests."""
    per_worker = [v for k, v in s["tiers"].items() if k.startswith("requests:")]
    return max(per_worker) / sum(per_worker) if per_worker else 0.0


TABLE_COLUMNS = (  # one row per configuration: (name, its summary)
    Column("config", 0, align="<"),
    Column("done", lambda r: r[1]["completed"]),
    Column("req/s", lambda r: r[1]["request_throughput"], ".2f"),
    Column("tok/s", lambda r: r[1]["output_throughput"], ".1f"),
    Column("TTFT ms", lambda r: r[1]["mean_ttft_ms"], ".1f"),
    Column("p99", lambda r: r[1]["p99_ttft_ms"], ".1f"),
    Column("ITL ms", lambda r: r[1]["mean_itl_ms"], ".1f"),
    Column("hit%", lambda r: 100 * r[1]["cache_hit_rate"], ".1f"),
    Column("pod%", lambda r: 100 * _pod_share(r[1]), ".1f"),
    Column("queue ms", lambda r: r[1]["tiers"]["queue_ms"], ".1f"),
    Column("max share", lambda r: _max_share(r[1]), ".2f"),
)


def _table(results: dict[str, dict[str, Any]]) -> str:
    return tables.plain(TABLE_COLUMNS, results.items())


def _plot(results: dict[str, dict[str, Any]], path: str) -> None:
    """Mean TTFT, output throughput and hit rate per configuration, as horizontal bars; kvcache's
    policy (``affinity``, serve's default) is coloured apart from the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"affinity": "tab:red", "least_loaded": "tab:green", "round_robin": "tab:blue"}
    names = list(results)
    labels = [n.replace(":nopod", ", pod tier off").replace(":pod", ", pod tier on") for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(12, 1.2 + 0.4 * len(names)), sharey=True, layout="constrained")
    keys = ("mean_ttft_ms", "output_throughput", "cache_hit_rate")
    titles = ("mean TTFT (lower is better)", "output throughput", "prefix cache hit rate")
    units = ("mean TTFT (ms)", "output tokens/s", "hit rate (%)")
    for ax, key, title, unit in zip(axes, keys, titles, units, strict=True):
        scale = 100.0 if key == "cache_hit_rate" else 1.0
        ax.barh(
            range(len(names)),
            [scale * results[n][key] for n in names],
            color=[colors.get(n.split(":")[0], "0.5") for n in names],
            hatch=["//" if n.endswith(":nopod") else "" for n in names],
            edgecolor="white",
        )
        ax.set_title(title)
        ax.set_xlabel(unit)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), labels)
    axes[0].set_ylabel("routing policy, pod tier")
    axes[0].invert_yaxis()
    handles = [
        Patch(color=colors["affinity"], label="affinity (kvcache, serve's default)"),
        Patch(color=colors["least_loaded"], label="least_loaded (baseline)"),
        Patch(color=colors["round_robin"], label="round_robin (baseline)"),
        Patch(facecolor="white", edgecolor="0.3", hatch="//", label="pod tier off"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
