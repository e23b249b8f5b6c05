"""Batched workers vs one-at-a-time workers, same server binary, same trace and rate, in one run.

    .venv/bin/python benches/serve_batching.py --workers 2 --model tiny --rate 8 --duration 15 --rounds 5

Starts two deployments side by side (each ``kvcache serve`` with its own Redis): ``batched`` runs
up to ``--max-num-seqs 64`` sequences per engine step, ``serial`` caps the engine at one
(``--max-num-seqs 1``: the worker of before, one request after another). Both let 256 requests
wait per worker, so neither refuses load. Then ``rounds`` times, alternating which goes first,
replays the same trace at the same Poisson rate with ``bench-serve``'s loop against each, and
prints per-round figures, the median of the rounds, the ratio serial / batched of p50 and p99
TTFT, and the load average before and after. Server logs go to ``--logs`` (created if missing); a
server that exits before its workers join stops the run at once with the end of its log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

CONFIGS = {"batched": 64, "serial": 1}
DEFAULT_TRACE = "synthetic:tenants=4,sessions=8,turns=5,system=256,user=64,output=16"
KEYS = ("p50_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "output_throughput", "completed", "failed")


def _start(
    args: argparse.Namespace, name: str, max_num_seqs: int
) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = serving.free_port()
    extra = ("--max-num-seqs", str(max_num_seqs), "--max-waiting", "256")
    cmd = serving.serve_command(
        model=args.model,
        port=port,
        workers=args.workers,
        threads=args.threads,
        num_blocks=args.num_blocks,
        extra=extra,
    )
    env = serving.own_deployment_env()
    log_path = Path(args.logs) / f"serve-batching-{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return process, f"http://127.0.0.1:{port}", log_path


def _wait_workers(
    url: str, n: int, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 300.0
) -> None:
    """Until ``url`` reports ``n`` workers; ``SystemExit`` with the log's end if the server exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise SystemExit(
                f"{url}: kvcache serve exited with code {process.returncode} before its "
                f"workers joined; {log_path} ends:\n" + "\n".join(tail)
            )
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if json.loads(resp.read())["workers"] == n:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}: {n} workers did not join in {timeout_s:g} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--num-blocks", type=int, default=1024)
    parser.add_argument("--trace", default=DEFAULT_TRACE)
    parser.add_argument("--rate", type=float, default=8.0)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--logs", default="/tmp")
    parser.add_argument("--out", default="serve_batching.json")
    args = parser.parse_args()

    trace = bench.load_trace(args.trace, vocab_size=256)
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    servers = {name: _start(args, name, running) for name, running in CONFIGS.items()}
    load_before = os.getloadavg()
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    try:
        for process, url, log_path in servers.values():
            _wait_workers(url, args.workers, process, log_path)
        for r in range(args.rounds):
            order = list(CONFIGS) if r % 2 == 0 else list(reversed(CONFIGS))
            for name in order:
                url = servers[name][1]
                load = bench.run_load(
                    url,
                    trace,
                    rate=args.rate,
                    duration_s=args.duration,
                    max_concurrency=args.max_concurrency,
                    keys={},
                    seed=r,
                )
                results, wall_s = asyncio.run(load)
                s = bench.summarize(results, wall_s, rate=args.rate, max_concurrency=args.max_concurrency)
                s["p50_ttft_ms"] = s["median_ttft_ms"]
                rounds[name].append({k: s[k] for k in KEYS})
                print(f"round {r} {name:8s} " + " ".join(f"{k}={s[k]:.1f}" for k in KEYS), flush=True)
    finally:
        for process, _, _ in servers.values():
            process.terminate()
        for process, _, _ in servers.values():
            process.wait(timeout=60)
    load_after = os.getloadavg()
    medians = {name: {k: statistics.median(x[k] for x in rs) for k in KEYS} for name, rs in rounds.items()}
    print(
        f"\nmedians of {args.rounds} rounds, {args.workers} workers, model {args.model}, "
        f"rate {args.rate}/s, {args.duration:g} s each; load average before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f}"
    )
    columns = [Column("server", "server", align="<"), *(Column(k, k, ".1f") for k in KEYS)]
    print(tables.plain(columns, [{"server": name, **m} for name, m in medians.items()]))
    ratios = {
        f"serial_over_batched_{k}": medians["serial"][k] / max(medians["batched"][k], 1e-9)
        for k in ("p50_ttft_ms", "p99_ttft_ms")
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    Path(args.out).write_text(
        json.dumps(
            {
                "args": vars(args),
                "rounds": rounds,
                "medians": medians,
                "ratios": ratios,
                "load_before": load_before,
                "load_after": load_after,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
