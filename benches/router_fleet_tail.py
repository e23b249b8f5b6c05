"""Why ``affinity``'s p99 TTFT misses at fleet scale: the tail requests of a matrix cell, and the
cell's verdict with the synthetic trace's request cap raised.

    python benches/router_fleet_tail.py [--cells bursty:1024,rag:1024,fleet:256,fleet:1024]
        [--caps 2500,10000] [--policies affinity,dynamo] [--json FILE]

For each (shape, workers) cell at the matrix's smallest fraction (5%) and each request cap
(``MatrixConfig.max_requests``; the matrix's default is 2,500), the cell is judged as the matrix
judges it (``matrix.run_cell`` under every compared policy, then ``matrix.verdict``), and
``--policies`` are replayed once more to read their requests' timings. Printed per policy:
requests, the workers that got any and requests per such worker; the share of requests that
waited before their prefill started (another request of the same worker ahead of them, or its
blocks held by running ones); then the tail, the requests at or above the p99 TTFT: how many,
how many waited, the median share of their TTFT spent waiting, the median number of requests
already on their worker when they arrived, on how many workers they sit, the median prompt of
the tail (and of all requests), and the p99 TTFT with the tail's most loaded worker left out
(how much one worker decides the figure); and per cell, how long the arrivals last and when the
last first token comes (after the trace's first arrival): a trace whose arrivals end long before
its queues drain measures how one burst is spread, not a steady state. Replays are
deterministic; one process. Reads only the replay's public result (each request's worker,
arrival, start and first-token times), so it reruns unchanged on another simulator.

Not here: the matrix and its verdict (``kvcache.lab.matrix``), the held-out choice of the
default (``router_heldout.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvcache.lab import tables
from kvcache.lab.matrix import MatrixConfig, cell_trace, pool_blocks, run_cell, verdict
from kvcache.lab.replay import ReplayConfig, ReplayResult, prepare, replay
from kvcache.lab.tables import Column

FRACTION = 0.05


def tail_stats(result: ReplayResult) -> dict[str, Any]:
    """The queueing behind one replay's p99 TTFT (see the module docstring)."""
    jobs = [j for j in result.jobs if j.first_token_ms > 0.0]
    ttft = np.array([j.first_token_ms - j.arrival_ms for j in jobs])
    p99 = float(np.percentile(ttft, 99))
    per_worker = Counter(j.worker_id for j in jobs)
    tail = [j for j, t in zip(jobs, ttft, strict=True) if t >= p99]
    tail_workers = Counter(j.worker_id for j in tail)
    busiest = tail_workers.most_common(1)[0][0]
    rest = np.array([t for j, t in zip(jobs, ttft, strict=True) if j.worker_id != busiest])

    def in_system(job: Any) -> int:  # requests of its worker that arrived before it and were unfinished
        return sum(
            1
            for o in jobs
            if o.worker_id == job.worker_id and o.arrival_ms < job.arrival_ms < o.finish_ms and o is not job
        )

    first_ms = min(j.arrival_ms for j in jobs)
    return {
        "requests": len(jobs),
        "span_s": (max(j.arrival_ms for j in jobs) - first_ms) / 1000,
        "drained_s": (max(j.first_token_ms for j in jobs) - first_ms) / 1000,
        "workers_used": len(per_worker),
        "mean_per_worker": len(jobs) / len(per_worker),
        "max_per_worker": max(per_worker.values()),
        "waited_share": sum(j.start_ms > j.arrival_ms for j in jobs) / len(jobs),
        "p99_ttft_ms": p99,
        "median_ttft_ms": float(np.median(ttft)),
        "tail": len(tail),
        "tail_waited": sum(j.start_ms > j.arrival_ms for j in tail),
        "tail_wait_share": statistics.median(
            (j.start_ms - j.arrival_ms) / (j.first_token_ms - j.arrival_ms) for j in tail
        ),
        "tail_ahead": statistics.median(in_system(j) for j in tail),
        "tail_prompt_tokens": statistics.median(j.request.num_tokens for j in tail),
        "median_prompt_tokens": statistics.median(j.request.num_tokens for j in jobs),
        "tail_workers": len(tail_workers),
        "tail_top_worker": tail_workers[busiest],
        "p99_without_top_worker_ms": float(np.percentile(rest, 99)),
    }


def tail_cell(
    shape: str, num_workers: int, max_requests: int, policies: Sequence[str]
) -> list[dict[str, Any]]:
    """One cell at one request cap: its verdict and ``tail_stats`` per policy."""
    cfg = MatrixConfig(
        shapes=(shape,), workers=(num_workers,), fractions=(FRACTION,), max_requests=max_requests
    )
    v = verdict(run_cell((shape, num_workers, cfg)))
    trace = cell_trace(shape, num_workers, cfg)
    assert trace.block_tokens is not None
    prompts = prepare(trace, trace.block_tokens)
    mean_blocks = sum(len(p.keys) for p in prompts) / len(prompts)
    capacity = pool_blocks(FRACTION, trace.unique_blocks(), num_workers, mean_blocks)
    rows = []
    for policy in policies:
        result = replay(trace, ReplayConfig(num_workers, capacity, policy, seed=cfg.seed), prompts=prompts)
        rows.append(
            {
                "shape": shape,
                "num_workers": num_workers,
                "max_requests": max_requests,
                "capacity_blocks": capacity,
                "policy": policy,
                "p99_ratio": v["p99_ratio"],
                "best_baseline_p99_policy": v["best_baseline_p99_policy"],
                "ok": v["ok"],
                **tail_stats(result),
            }
        )
    return rows


TAIL_COLUMNS = (
    Column(
        "cell (cap; blocks per worker)",
        lambda r: f"{r['shape']} {r['num_workers']:,} x 5% ({r['max_requests']:,}; {r['capacity_blocks']})",
        align="<",
    ),
    Column("arrivals span s (last first token)", lambda r: f"{r['span_s']:.1f} ({r['drained_s']:.1f})"),
    Column(
        "verdict: p99 / best baseline",
        lambda r: f"{r['p99_ratio']:.2f} ({r['best_baseline_p99_policy']}){'' if r['ok'] else ' miss'}",
        align="<",
    ),
    Column("policy", "policy", align="<"),
    Column(
        "requests per worker (workers used; max)",
        lambda r: f"{r['mean_per_worker']:.1f} ({r['workers_used']:,}; {r['max_per_worker']})",
    ),
    Column("waited", "waited_share", ".0%"),
    Column("p99 TTFT ms", "p99_ttft_ms", ",.0f"),
    Column("tail requests (waited)", lambda r: f"{r['tail']} ({r['tail_waited']})"),
    Column("tail wait / TTFT", "tail_wait_share", ".0%"),
    Column("requests ahead", "tail_ahead", ".0f"),
    Column(
        "tail prompt tokens (all)",
        lambda r: f"{r['tail_prompt_tokens']:,.0f} ({r['median_prompt_tokens']:,.0f})",
    ),
    Column("tail on workers (most on one)", lambda r: f"{r['tail_workers']} ({r['tail_top_worker']})"),
    Column("p99 without that worker ms", "p99_without_top_worker_ms", ",.0f"),
)


def tail_table(rows: Sequence[dict[str, Any]]) -> str:
    return tables.markdown(TAIL_COLUMNS, rows) + "\n"


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cells", default="bursty:1024,rag:1024,fleet:256,fleet:1024", help="shape:workers,..."
    )
    parser.add_argument("--caps", default="2500,10000", help="comma list of request caps (max_requests)")
    parser.add_argument("--policies", default="affinity,dynamo", help="policies whose tails are read")
    parser.add_argument("--json", default=None, help="write every row here")
    args = parser.parse_args()
    cells = [(s, int(w)) for s, w in (c.split(":") for c in args.cells.split(","))]
    caps = [int(c) for c in args.caps.split(",")]
    policies = args.policies.split(",")
    started = time.perf_counter()
    print(f"load average {_load()}", flush=True)
    rows = []
    for shape, workers in cells:
        for cap in caps:
            rows += tail_cell(shape, workers, cap, policies)
            print(tail_table(rows[-len(policies) :]).splitlines()[-1], f"load {_load()}", flush=True)
    print(tail_table(rows), end="")
    print(f"{(time.perf_counter() - started) / 60:.1f} min wall, one process; load average {_load()}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"fraction": FRACTION, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
