"""Candidates for the default routing policy, chosen on half the matrix's shapes and judged on
the other half.

    python benches/router_heldout.py --trace ../shared/traces/mooncake_synthetic_trace.jsonl \
        [--workers 4,16,64] [--json FILE]

The split is fixed: the candidates are compared on the tuning shapes (``TUNING``: rag and
long_agent) only; the one passing the matrix's three checks (Pareto, hit >= 95% of the bar,
p99 <= 1.05x the best baseline; ``matrix.verdict``) in the most tuning cells, then with the
lowest median p99 / best baseline, is chosen, and only it and ``affinity`` (the default) are
replayed on the held-out shapes (``HELD_OUT``: bursty, fleet and the Mooncake trace), against
the same seven baselines, at every worker count x 5%, 10% and 30% capacity. Each variant stands
in for ``affinity`` in the verdict, so candidates never set each other's bars. Prints the load
average before and after, one Markdown table per half (cells passing each check, median hit /
bar, median p99 / best baseline) and, with ``--json``, every cell's verdict per variant
(docs/router_heldout.json). Replays are deterministic; one process.

Not here: the candidates themselves (``kvcache.router.policies``), the verdict and the cells
(``kvcache.lab.matrix``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvcache.lab.matrix import MatrixConfig, run_cell, verdict
from kvcache.router.policies import (
    BASELINES,
    POLICIES,
    Policy,
    make_affinity,
    make_affinity_output,
    make_affinity_softmax,
    make_bounded_hash,
    make_dynamo_band,
    make_exploit_explore,
)

TUNING = ("rag", "long_agent")
HELD_OUT = ("bursty", "fleet", "trace")
FRACTIONS = (0.05, 0.1, 0.3)
DEFAULT = "affinity (default)"
CANDIDATES: dict[str, Callable[[], Policy]] = {
    DEFAULT: make_affinity,
    "exploit_explore (exploit above 0.5 of the prompt)": lambda: make_exploit_explore(0.5),
    "exploit_explore (exploit above 0.8)": lambda: make_exploit_explore(0.8),
    "bounded_hash (load factor 1.25)": lambda: make_bounded_hash(1.25),
    "bounded_hash (load factor 2)": lambda: make_bounded_hash(2.0),
    "dynamo_band (slack 0.5)": lambda: make_dynamo_band(1.0, 0.5),
    "dynamo_band (slack 2)": lambda: make_dynamo_band(1.0, 2.0),
    "affinity_softmax (temperature 0.25)": lambda: make_affinity_softmax(0.5, 0.25),
    "affinity_softmax (temperature 1)": lambda: make_affinity_softmax(0.5, 1.0),
    "affinity_output": make_affinity_output,
}


def _name(label: str) -> str:
    return f"heldout{list(CANDIDATES).index(label)}"


def judge(
    labels: Sequence[str], shapes: Sequence[str], workers: Sequence[int], trace: str | None
) -> dict[str, list[dict[str, Any]]]:
    """Every cell's verdict for each of ``labels``, each standing in for affinity in turn."""
    for label in labels:
        POLICIES[_name(label)] = CANDIDATES[label]()  # this process's registry only
    cfg = MatrixConfig(
        shapes=(),
        fractions=FRACTIONS,
        policies=(*BASELINES, *(_name(label) for label in labels)),
        trace_path=trace,
    )
    verdicts: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for shape in shapes:
        for num_workers in workers:
            started = time.perf_counter()
            rows = run_cell((shape, num_workers, cfg))
            print(f"  {shape} x {num_workers} workers: {time.perf_counter() - started:.0f} s", flush=True)
            for fraction in FRACTIONS:
                at = [r for r in rows if r["fraction"] == fraction]
                cell = {k: at[0][k] for k in ("shape", "num_workers", "fraction", "capacity_blocks")}
                for label in labels:
                    mine = [r for r in at if r["policy"] in BASELINES or r["policy"] == _name(label)]
                    me = next(r for r in mine if r["policy"] == _name(label))
                    verdicts[label].append(
                        {
                            **cell,
                            **verdict(mine, ours=_name(label)),
                            "token_hit_rate": me["token_hit_rate"],
                            "p99_ttft_ms": me["p99_ttft_ms"],
                        }
                    )
    return verdicts


def choose(verdicts: dict[str, list[dict[str, Any]]]) -> str:
    """Most cells passing all three checks, then the lowest median p99 / best baseline."""
    return min(
        verdicts,
        key=lambda label: (
            -sum(v["ok"] for v in verdicts[label]),
            statistics.median(v["p99_ratio"] for v in verdicts[label]),
        ),
    )


def table(verdicts: dict[str, list[dict[str, Any]]]) -> str:
    """Per variant: cells passing each check, median hit / bar and median p99 / best baseline."""
    lines = [
        "| variant | passing | Pareto | hit bar | p99 bar | median hit / bar | median p99 / best baseline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, vs in verdicts.items():
        lines.append(
            f"| {label} | {sum(v['ok'] for v in vs)}/{len(vs)} | {sum(v['pareto'] for v in vs)} | "
            f"{sum(v['hit_bar'] for v in vs)} | {sum(v['p99_bar'] for v in vs)} | "
            f"{statistics.median(v['hit_ratio'] for v in vs):.3f} | "
            f"{statistics.median(v['p99_ratio'] for v in vs):.3f} |"
        )
    return "\n".join(lines) + "\n"


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", required=True, help="the Mooncake trace (a held-out shape)")
    parser.add_argument("--workers", default="4,16,64", help="comma list of worker counts")
    parser.add_argument("--json", default=None, help="write every cell's verdict per variant here")
    args = parser.parse_args()
    workers = tuple(int(w) for w in args.workers.split(","))
    started = time.perf_counter()
    print(f"load average {_load()}; tuning on {', '.join(TUNING)} x {args.workers} workers", flush=True)
    tuning = judge(list(CANDIDATES), TUNING, workers, args.trace)
    print(table(tuning), end="")
    chosen = choose(tuning)
    print(f"chosen on the tuning shapes: {chosen}; held out: {', '.join(HELD_OUT)}", flush=True)
    held = judge(list(dict.fromkeys([DEFAULT, chosen])), HELD_OUT, workers, args.trace)
    print(table(held), end="")
    wall_s = time.perf_counter() - started
    print(f"{wall_s / 60:.1f} min wall, one process; load average {_load()}")
    if args.json:
        payload = {
            "trace": args.trace,
            "workers": list(workers),
            "fractions": list(FRACTIONS),
            "tuning_shapes": list(TUNING),
            "held_out_shapes": list(HELD_OUT),
            "chosen": chosen,
            "tuning": tuning,
            "held_out": held,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
