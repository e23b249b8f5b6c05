"""How far the router's modelled schedule is from the schedule the workers run.

    python benches/router_forecast.py [--cells rag:16,bursty:16,long_agent:16,fleet:64]
        [--fractions 0.05,0.3] [--trace ../shared/traces/mooncake_synthetic_trace.jsonl] [--json FILE]

The router prices each placement with a closed-form forecast per worker (``kvcache.router.router``:
a request's prefill starts when the modelled prefills ahead of it end and, with every sequence seat
taken, when the earliest modelled finish frees one; it lasts ``LatencyModel.prefill_ms``). The
replay's simulated workers run the engine's own scheduler (chunk budget shared by several prefills,
seats, FCFS, preemption), each step priced by the same latency model. This benchmark replays each
cell under ``affinity`` (the policy that reads the forecast) and, for every request at its first
placement, compares the router's forecast of its first token (the worker's modelled prefill end
right after the route) with the simulated first token.

Printed per cell: requests, the share that waited for a seat or a step before their prefill
started (where the scheduling rules bind), the forecast TTFT over the simulated TTFT at the 10th,
50th and 90th percentiles, the median absolute error in milliseconds and relative to the simulated
TTFT, and Spearman's rank correlation between forecast and simulated TTFT (how well the forecast
orders requests, which is what a placement needs). Replays are deterministic; one process.

The forecast is read by wrapping ``Router.route`` in this process only (the wrapper records the
chosen worker's ``prefill_free_ms``); nothing else changes.

Not here: the matrix and its verdicts (``kvcache.lab.matrix``), real-engine TTFT
(``sim_vs_real.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvcache.lab import tables
from kvcache.lab.matrix import MatrixConfig, cell_trace, pool_blocks
from kvcache.lab.replay import ReplayConfig, prepare, replay
from kvcache.lab.tables import Column
from kvcache.lab.trace import Trace, read_trace
from kvcache.router.policies import RoutingInput, WorkerId, ttft_cost_column
from kvcache.router.router import Router, RouteRequest

POLICY = "affinity"


class _Forecasts:
    """Wraps ``Router.route`` for the life of a ``with`` block: for each request at its first
    placement, the modelled first token (in the router's clock) and ``affinity``'s cost of the
    chosen worker (its modelled TTFT with the memory wait, ``policies.ttft_cost_column``)."""

    def __init__(self) -> None:
        self.first_token_ms: dict[Hashable, float] = {}
        self.cost_ms: dict[Hashable, float] = {}

    def __enter__(self) -> _Forecasts:
        original = Router.route
        record, costs = self.first_token_ms, self.cost_ms
        chosen_cost: list[float] = []

        def route(router: Router, request: RouteRequest) -> Any:
            if not getattr(router.policy, "_forecast", False):
                policy = router.policy

                def with_cost(inp: RoutingInput) -> WorkerId:
                    cols = inp.columns()
                    worker = policy(inp)
                    position = list(cols.worker_id).index(worker)
                    chosen_cost.append(float(ttft_cost_column(inp, cols)[position]))
                    return worker

                with_cost._forecast = True  # type: ignore[attr-defined]
                router.policy = with_cost
            worker = original(router, request)
            if request.request_id not in record:
                record[request.request_id] = router.loads[worker].prefill_free_ms
                costs[request.request_id] = chosen_cost[-1]
            return worker

        self._original = original
        Router.route = route  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Router.route = self._original  # type: ignore[method-assign]


def _ranks(x: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    return ranks


def forecast_cell(name: str, trace: Trace, num_workers: int, capacity: int) -> dict[str, Any]:
    assert trace.block_tokens is not None
    prompts = prepare(trace, trace.block_tokens)
    with _Forecasts() as forecasts:
        result = replay(trace, ReplayConfig(num_workers, capacity, POLICY), prompts=prompts)
    jobs = [j for j in result.jobs if j.first_token_ms > 0.0 and j.attempts == 1]
    actual = np.array([j.first_token_ms - j.arrival_ms for j in jobs])
    forecast = np.array([forecasts.first_token_ms[j.request_id] - j.arrival_ms for j in jobs])
    cost = np.array([forecasts.cost_ms[j.request_id] for j in jobs])
    cost_ratio = cost / np.maximum(actual, 1e-9)
    ratio = forecast / np.maximum(actual, 1e-9)
    error = np.abs(forecast - actual)
    p10, p50, p90 = np.percentile(ratio, [10, 50, 90])
    return {
        "cell": name,
        "num_workers": num_workers,
        "capacity_blocks": capacity,
        "requests": len(jobs),
        "waited_share": float(np.mean([j.start_ms > j.arrival_ms for j in jobs])),
        "ratio_p10": float(p10),
        "ratio_p50": float(p50),
        "ratio_p90": float(p90),
        "median_abs_error_ms": float(np.median(error)),
        "median_rel_error": float(np.median(error / np.maximum(actual, 1e-9))),
        "spearman": float(np.corrcoef(_ranks(forecast), _ranks(actual))[0, 1]),
        "cost_ratio_p50": float(np.median(cost_ratio)),
        "cost_spearman": float(np.corrcoef(_ranks(cost), _ranks(actual))[0, 1]),
        "median_ttft_ms": float(np.median(actual)),
    }


TABLE_COLUMNS = (
    Column("cell (blocks per worker)", lambda r: f"{r['cell']} ({r['capacity_blocks']})", align="<"),
    Column("requests", "requests", ","),
    Column("waited", "waited_share", ".0%"),
    Column(
        "forecast / simulated TTFT p10 / p50 / p90",
        lambda r: f"{r['ratio_p10']:.2f} / {r['ratio_p50']:.2f} / {r['ratio_p90']:.2f}",
        align="<",
    ),
    Column(
        "median abs error ms (relative)",
        lambda r: f"{r['median_abs_error_ms']:,.0f} ({r['median_rel_error']:.0%})",
    ),
    Column("rank correlation", "spearman", ".2f"),
    Column(
        "affinity cost / simulated p50 (rank correlation)",
        lambda r: f"{r['cost_ratio_p50']:.2f} ({r['cost_spearman']:.2f})",
    ),
    Column("simulated median TTFT ms", "median_ttft_ms", ",.0f"),
)


def table(rows: Sequence[dict[str, Any]]) -> str:
    return tables.markdown(TABLE_COLUMNS, rows) + "\n"


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cells", default="rag:16,bursty:16,long_agent:16,fleet:64", help="shape:workers,..."
    )
    parser.add_argument("--fractions", default="0.05,0.3", help="pool fractions, as the matrix's")
    parser.add_argument("--trace", default=None, help="also a Mooncake trace at 16 workers, 10%% capacity")
    parser.add_argument("--json", default=None, help="write every row here")
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"load average {_load()}", flush=True)
    rows = []
    cfg = MatrixConfig()
    for cell in args.cells.split(","):
        shape, workers = cell.split(":")
        num_workers = int(workers)
        trace = cell_trace(shape, num_workers, cfg)
        assert trace.block_tokens is not None
        prompts = prepare(trace, trace.block_tokens)
        mean_blocks = sum(len(p.keys) for p in prompts) / len(prompts)
        for fraction in (float(f) for f in args.fractions.split(",")):
            capacity = pool_blocks(fraction, trace.unique_blocks(), num_workers, mean_blocks)
            rows.append(
                forecast_cell(f"{shape} {num_workers} x {fraction:.0%}", trace, num_workers, capacity)
            )
            print(table(rows[-1:]).splitlines()[-1], f"load {_load()}", flush=True)
    if args.trace:
        trace = read_trace(args.trace, 512)
        capacity = int(0.1 * trace.unique_blocks() / 16)
        rows.append(forecast_cell(f"{Path(args.trace).stem} 16 x 10%", trace, 16, capacity))
    print(table(rows), end="")
    print(f"{(time.perf_counter() - started) / 60:.1f} min wall, one process; load average {_load()}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"policy": POLICY, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
