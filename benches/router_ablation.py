"""Ablation of affinity's cost terms on the benchmark matrix's cells.

    python benches/router_ablation.py [--trace ../shared/traces/mooncake_synthetic_trace.jsonl]

Each variant replaces ``affinity`` in turn and is judged against the same baselines by the
matrix's verdict (Pareto, hit >= 95% of the bar, p99 <= 1.05x the best baseline), on every
shape at 4 and 16 workers x 5% and 10% capacity (and the trace at 16 workers). Prints a Markdown
table: cells passing, and the median hit and p99 ratios. Replays are deterministic.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
from typing import Any

from kvcache.router.matrix import MatrixConfig, run_cell, verdict
from kvcache.router.policies import BASELINES, POLICIES, make_affinity

VARIANTS: dict[str, dict[str, float]] = {
    "affinity (default)": {},
    "no memory wait": {"memory_weight": 0.0},
    "no locality slack": {"locality_slack": 0.0},
    "recompute weight 1.5": {"recompute_weight": 1.5},
    "earlier default (r 1.5, no memory, no slack)": {
        "recompute_weight": 1.5,
        "memory_weight": 0.0,
        "locality_slack": 0.0,
    },
}


def _names() -> dict[str, str]:
    return {label: f"ablation{i}" for i, label in enumerate(VARIANTS)}


def _cell(args: tuple[str, int, str | None]) -> list[dict[str, Any]]:
    shape, workers, trace = args
    for label, name in _names().items():
        POLICIES[name] = make_affinity(**VARIANTS[label])  # this process's registry only
    cfg = MatrixConfig(
        shapes=(), fractions=(0.05, 0.1), policies=(*BASELINES, *_names().values()), trace_path=trace
    )
    return run_cell((shape, workers, cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=None)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    cells: list[tuple[str, int, str | None]] = [
        (s, w, None) for s in ("rag", "bursty", "long_agent", "fleet") for w in (4, 16)
    ]
    if args.trace:
        cells.append(("trace", 16, args.trace))
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        per_trace = pool.map(_cell, cells, chunksize=1)
    results = [[r for r in rows if r["fraction"] == f] for rows in per_trace for f in (0.05, 0.1)]
    print(f"{len(results)} cells: " + ", ".join(f"{s} {w} workers" for s, w, _ in cells) + " x 5%, 10%")
    print("| variant | passing | Pareto | hit bar | p99 bar | median hit / bar | median p99 / best base |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, name in _names().items():
        verdicts = []
        for rows in results:
            mine = [r for r in rows if r["policy"] in BASELINES or r["policy"] == name]
            verdicts.append(verdict(mine, ours=name))
        print(
            f"| {label} | {sum(v['ok'] for v in verdicts)}/{len(verdicts)} | "
            f"{sum(v['pareto'] for v in verdicts)} | {sum(v['hit_bar'] for v in verdicts)} | "
            f"{sum(v['p99_bar'] for v in verdicts)} | "
            f"{statistics.median(v['hit_ratio'] for v in verdicts):.3f} | "
            f"{statistics.median(v['p99_ratio'] for v in verdicts):.3f} |"
        )


if __name__ == "__main__":
    main()
