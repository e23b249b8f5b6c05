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
(docs/router_heldout.json). ``--stays`` also replays the small-pool cells of ``SMALL_POOLS``
under affinity and lpm_balanced, recording how often each leaves the worker that holds a
request's prefix. Replays are deterministic; one process.

The candidate list grew twice: the ``affinity_decode`` variants were added after a first run had
chosen ``dynamo_band`` and shown its held-out result, and ``affinity_release`` after that, so the
held-out half has been seen three times.

``--compare LABEL,...`` (labels as in ``CANDIDATES``, or a prefix of one) skips the protocol: it
judges the default and the named candidates on every shape, tuning and held-out alike, and
prints one table (a look at a candidate, not a choice).

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

from kvcache.lab import report, tables
from kvcache.lab.matrix import MatrixConfig, cell_trace, pool_blocks, run_cell, verdict, verdicts_table
from kvcache.lab.replay import ReplayConfig, prepare, replay
from kvcache.lab.tables import Column
from kvcache.router.policies import (
    BASELINES,
    POLICIES,
    Policy,
    RoutingInput,
    WorkerId,
    make_affinity,
    make_affinity_decode,
    make_affinity_output,
    make_affinity_release,
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
    "affinity_decode (decode weight 1, slack 0.5)": lambda: make_affinity_decode(1.0, 0.5),
    "affinity_decode (decode weight 1, slack 2)": lambda: make_affinity_decode(1.0, 2.0),
    "affinity_decode (decode weight 0.25, slack 1)": lambda: make_affinity_decode(0.25, 1.0),
    "affinity_release (modelled memory release)": make_affinity_release,
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


table = verdicts_table  # the one formatter, kvcache.lab.matrix


# Cells where affinity misses at small per-worker pools (docs/router.md "Why the default loses
# at small per-worker pools"): (shape, workers, fraction).
SMALL_POOLS = (("bursty", 16, 0.05), ("bursty", 64, 0.05), ("rag", 16, 0.05), ("fleet", 4, 0.05))


def stays(shape: str, num_workers: int, fraction: float, policy: str, trace: str | None) -> dict[str, Any]:
    """One replay of a matrix cell under ``policy``, recording each decision: of the requests
    whose prefix some worker holds, the share sent elsewhere ("moved") and the share of their
    prompt tokens that move leaves behind; with the replay's hit rate and TTFT percentiles."""
    cfg = MatrixConfig(trace_path=trace)
    tr = cell_trace(shape, num_workers, cfg)
    assert tr.block_tokens is not None
    prompts = prepare(tr, tr.block_tokens)
    mean_blocks = sum(len(p.keys) for p in prompts) / len(prompts)
    capacity = pool_blocks(fraction, tr.unique_blocks(), num_workers, mean_blocks)
    inner, decisions = POLICIES[policy], []

    def recorded(inp: RoutingInput) -> WorkerId:
        chosen = inner(inp)
        cols = inp.columns()
        at = cols.worker_id.tolist().index(chosen)
        decisions.append((int(cols.overlap_blocks.max()), int(cols.overlap_blocks[at]), inp.num_tokens))
        return chosen

    POLICIES["stays_recorded"] = recorded  # this process's registry only
    result = replay(tr, ReplayConfig(num_workers, capacity, "stays_recorded", seed=cfg.seed), prompts=prompts)
    m = report.metrics(result)
    reusable = [d for d in decisions if d[0] > 0]
    moved = [d for d in reusable if d[1] < d[0]]
    block = tr.block_tokens
    return {
        "shape": shape,
        "num_workers": num_workers,
        "fraction": fraction,
        "capacity_blocks": capacity,
        "policy": policy,
        "reusable_share": len(reusable) / len(decisions),
        "moved_share": len(moved) / max(1, len(reusable)),
        "left_behind_share": sum(min(n, (b - c) * block) for b, c, n in moved)
        / max(1, sum(n for _, _, n in reusable)),
        "token_hit_rate": m["token_hit_rate"],
        "median_ttft_ms": m["median_ttft_ms"],
        "p99_ttft_ms": m["p99_ttft_ms"],
    }


STAYS_COLUMNS = (
    Column(
        "cell (blocks per worker)",
        lambda r: f"{r['shape']} {r['num_workers']} x {r['fraction']:.0%} ({r['capacity_blocks']})",
        align="<",
    ),
    Column("policy", "policy", align="<"),
    Column("prefix held somewhere", "reusable_share", ".0%"),
    Column("moved off it", "moved_share", ".0%"),
    Column("prompt tokens left behind", "left_behind_share", ".0%"),
    Column("token hit", "token_hit_rate", ".1%"),
    Column("median TTFT ms", "median_ttft_ms", ",.0f"),
    Column("p99 TTFT ms", "p99_ttft_ms", ",.0f"),
)


def stays_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per cell and policy: requests with a reusable prefix, the share moved off it, the prompt
    tokens those moves leave behind, hit rate and TTFT."""
    return tables.markdown(STAYS_COLUMNS, rows) + "\n"


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def compare(prefixes: Sequence[str], workers: Sequence[int], trace: str, path: str | None) -> None:
    """``--compare``: the default and the candidates named by ``prefixes`` on every shape."""
    labels = [DEFAULT]
    for prefix in prefixes:
        found = [label for label in CANDIDATES if label.startswith(prefix)]
        if len(found) != 1:
            raise SystemExit(
                f"--compare {prefix!r} names {len(found)} candidates; pick one of {list(CANDIDATES)}"
            )
        labels.append(found[0])
    print(f"load average {_load()}; comparing {', '.join(labels)} x {', '.join(map(str, workers))} workers")
    verdicts = judge(labels, (*TUNING, *HELD_OUT), workers, trace)
    print(table(verdicts), end="")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(
                {"trace": trace, "workers": list(workers), "fractions": list(FRACTIONS), **verdicts},
                f,
                indent=1,
            )
        print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", required=True, help="the Mooncake trace (a held-out shape)")
    parser.add_argument("--workers", default="4,16,64", help="comma list of worker counts")
    parser.add_argument("--json", default=None, help="write every cell's verdict per variant here")
    parser.add_argument(
        "--stays",
        action="store_true",
        help="also measure how often affinity and lpm_balanced leave a held prefix (SMALL_POOLS)",
    )
    parser.add_argument("--compare", default=None, help="judge only these candidates on every shape")
    args = parser.parse_args()
    workers = tuple(int(w) for w in args.workers.split(","))
    started = time.perf_counter()
    if args.compare:
        compare(args.compare.split(","), workers, args.trace, args.json)
        print(f"{(time.perf_counter() - started) / 60:.1f} min wall, one process; load average {_load()}")
        return
    print(f"load average {_load()}; tuning on {', '.join(TUNING)} x {args.workers} workers", flush=True)
    tuning = judge(list(CANDIDATES), TUNING, workers, args.trace)
    print(table(tuning), end="")
    chosen = choose(tuning)
    print(f"chosen on the tuning shapes: {chosen}; held out: {', '.join(HELD_OUT)}", flush=True)
    held = judge(list(dict.fromkeys([DEFAULT, chosen])), HELD_OUT, workers, args.trace)
    print(table(held), end="")
    stays_rows = []
    if args.stays:
        stays_rows = [
            stays(*cell, p, args.trace) for cell in SMALL_POOLS for p in ("affinity", "lpm_balanced")
        ]
        print(stays_table(stays_rows), end="")
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
            "stays": stays_rows,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
