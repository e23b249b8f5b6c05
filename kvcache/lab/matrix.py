"""The routing benchmark matrix: workload shapes x worker counts x cache capacities x policies,
each cell replayed under every policy, and the verdict on ``affinity`` in each cell.

A cell's trace comes from ``workloads.synthesize_shape`` (seeded), scaled with ``trace.scale_to_load`` so
every worker count sees the same offered prefill load. Its size grows with the worker count so
that a worker's pool at the smallest capacity still holds a few requests (``requests_for``),
and a pool never holds fewer than ``MIN_POOL_REQUESTS`` mean-sized requests (the effective
fraction is recorded next to the asked one). A Mooncake trace file can join the matrix as
one more shape (its own timestamps, not rescaled).

The verdict (``verdict``) checks three things for ``affinity`` against the others in a cell:
no baseline has both a higher token hit rate and a lower p99 TTFT (``pareto``); its hit rate
is at least 95% of the best among the policies whose p99 TTFT is within 1.5x of the best p99
(``hit_bar``); its p99 TTFT is at most 1.05x the best baseline's (``p99_bar``). Replays are
deterministic simulations: the same command prints the same numbers on every machine.
This module runs and judges; ``report`` computes each replay's metrics.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvcache.costs import LatencyModel
from kvcache.lab import report, tables
from kvcache.lab.replay import ReplayConfig, prepare, replay
from kvcache.lab.tables import Column
from kvcache.lab.trace import FORMAT_MOONCAKE, Trace, read_trace, scale_to_load
from kvcache.lab.workloads import SHAPES, ShapeConfig, synthesize_shape
from kvcache.router.policies import BASELINES, COMPARED, POLICIES

OURS = "affinity"
MIN_POOL_REQUESTS = 2
HIT_SHARE, TAIL_BAND, P99_SLACK = 0.95, 1.5, 1.05
_KEEP = (
    "policy",
    "num_workers",
    "capacity_blocks",
    "token_hit_rate",
    "block_hit_rate",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p90_ttft_ms",
    "p99_ttft_ms",
    "request_throughput",
    "load_imbalance",
    "load_imbalance_60s_max",
    "lost",
)


@dataclass(frozen=True, slots=True)
class MatrixConfig:
    shapes: tuple[str, ...] = SHAPES
    workers: tuple[int, ...] = (4, 16, 64)
    fractions: tuple[float, ...] = (0.05, 0.1, 0.3)
    policies: tuple[str, ...] = COMPARED  # other registered policies only by name
    load: float = 0.5
    min_requests: int = 1000
    max_requests: int = 2500
    seed: int = 0
    trace_path: str | None = None  # a Mooncake trace replayed as one more shape
    latency: LatencyModel = field(default_factory=LatencyModel)  # cells scaled and replayed on it


def requests_for(shape: str, num_workers: int, cfg: MatrixConfig) -> int:
    """Enough requests that a pool at the smallest fraction holds MIN_POOL_REQUESTS requests."""
    pilot = synthesize_shape(ShapeConfig(shape, cfg.min_requests, seed=cfg.seed))
    unique_per_request = Trace(pilot, FORMAT_MOONCAKE, 512).unique_blocks() / len(pilot)
    mean_blocks = sum(len(r.block_ids or ()) for r in pilot) / len(pilot)
    need = MIN_POOL_REQUESTS * mean_blocks * num_workers / (min(cfg.fractions) * unique_per_request)
    return max(cfg.min_requests, min(cfg.max_requests, math.ceil(need)))


def cell_trace(shape: str, num_workers: int, cfg: MatrixConfig) -> Trace:
    if shape == "trace":
        assert cfg.trace_path is not None
        return read_trace(cfg.trace_path)
    reqs = synthesize_shape(ShapeConfig(shape, requests_for(shape, num_workers, cfg), seed=cfg.seed))
    return Trace(scale_to_load(reqs, num_workers, cfg.load, cfg.latency), FORMAT_MOONCAKE, 512)


def pool_blocks(fraction: float, unique_blocks: int, num_workers: int, mean_request_blocks: float) -> int:
    """A worker's pool in a cell: ``fraction`` of the trace's unique blocks over the workers,
    never under ``MIN_POOL_REQUESTS`` mean-sized requests."""
    return max(
        int(fraction * unique_blocks / num_workers), math.ceil(MIN_POOL_REQUESTS * mean_request_blocks)
    )


def run_cell(args: tuple[str, int, MatrixConfig]) -> list[dict[str, Any]]:
    """Every fraction x policy on one (shape, workers) trace; rows carry their cell's keys."""
    shape, num_workers, cfg = args
    trace = cell_trace(shape, num_workers, cfg)
    assert trace.block_tokens is not None
    bs = trace.block_tokens
    prompts = prepare(trace, bs)
    unique = trace.unique_blocks()
    mean_blocks = sum(len(p.keys) for p in prompts) / len(prompts)
    rows = []
    for fraction in cfg.fractions:
        capacity = pool_blocks(fraction, unique, num_workers, mean_blocks)
        for policy in cfg.policies:
            result = replay(
                trace,
                ReplayConfig(num_workers, capacity, policy, latency=cfg.latency, seed=cfg.seed),
                prompts=prompts,
            )
            m = report.metrics(result)
            row = {k: m[k] for k in _KEEP}
            row.update(
                shape=shape,
                fraction=fraction,
                effective_fraction=capacity * num_workers / unique,
                num_requests=len(trace.requests),
                wall_s=result.wall_s,
            )
            rows.append(row)
    return rows


def verdict(rows: Sequence[dict[str, Any]], ours: str = OURS) -> dict[str, Any]:
    """The three checks for ``ours`` among one cell's rows (one row per policy)."""
    by = {r["policy"]: r for r in rows}
    me = by[ours]
    base = [r for r in rows if r["policy"] in BASELINES]
    judged = [*base, me]  # other policies replayed in the cell (candidates) set no bar
    best_p99 = min(r["p99_ttft_ms"] for r in judged)
    band = [r for r in judged if r["p99_ttft_ms"] <= TAIL_BAND * best_p99]
    bar_row = max(band, key=lambda r: r["token_hit_rate"])
    best_base_p99 = min(base, key=lambda r: r["p99_ttft_ms"])
    dominators = [
        r["policy"]
        for r in base
        if r["token_hit_rate"] > me["token_hit_rate"] and r["p99_ttft_ms"] < me["p99_ttft_ms"]
    ]
    hit_ratio = me["token_hit_rate"] / bar_row["token_hit_rate"] if bar_row["token_hit_rate"] else 1.0
    p99_ratio = me["p99_ttft_ms"] / best_base_p99["p99_ttft_ms"]
    return {
        "pareto": not dominators,
        "dominated_by": dominators,
        "hit_bar": hit_ratio >= HIT_SHARE,
        "hit_ratio": hit_ratio,
        "hit_bar_policy": bar_row["policy"],
        "p99_bar": p99_ratio <= P99_SLACK,
        "p99_ratio": p99_ratio,
        "best_baseline_p99_policy": best_base_p99["policy"],
        "ok": not dominators and hit_ratio >= HIT_SHARE and p99_ratio <= P99_SLACK,
    }


VERDICT_COLUMNS = (  # one row per variant: (label, its verdicts)
    Column("variant", 0, align="<"),
    Column("passing", lambda v: f"{sum(x['ok'] for x in v[1])}/{len(v[1])}"),
    Column("Pareto", lambda v: sum(x["pareto"] for x in v[1])),
    Column("hit bar", lambda v: sum(x["hit_bar"] for x in v[1])),
    Column("p99 bar", lambda v: sum(x["p99_bar"] for x in v[1])),
    Column("median hit / bar", lambda v: statistics.median(x["hit_ratio"] for x in v[1]), ".3f"),
    Column("median p99 / best baseline", lambda v: statistics.median(x["p99_ratio"] for x in v[1]), ".3f"),
)


def verdicts_table(verdicts: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: per variant (a policy or a configuration of one), the cells passing each check of
    ``verdict``, the median hit / bar and the median p99 / best baseline."""
    return tables.markdown(VERDICT_COLUMNS, verdicts.items()) + "\n"


def run_matrix(cfg: MatrixConfig, jobs: int = 1) -> dict[str, Any]:
    """Every cell; ``jobs`` > 1 replays (shape, workers) traces in that many processes."""
    shapes = [*cfg.shapes, *(["trace"] if cfg.trace_path else [])]
    tasks = [(s, w, cfg) for s in shapes for w in cfg.workers]
    tasks.sort(key=lambda t: -t[1])  # the biggest first, so the pool ends together
    progress = tqdm(total=len(tasks), desc="matrix traces", unit="trace", leave=False, disable=None)
    if jobs > 1:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            results = []
            for rows in pool.imap(run_cell, tasks, chunksize=1):
                results.append(rows)
                progress.update()
            pool.close()  # the workers exit before the pool is torn down: nothing left to clean up
            pool.join()
    else:
        results = []
        for task in tasks:
            results.append(run_cell(task))
            progress.update()
    progress.close()
    rows = sorted((r for cell in results for r in cell), key=_cell_key)
    cells = []
    for key in dict.fromkeys(_cell_key(r)[:3] for r in rows):
        at = [r for r in rows if _cell_key(r)[:3] == key]
        cell = {k: at[0][k] for k in ("shape", "num_workers", "fraction", "num_requests", "capacity_blocks")}
        cells.append({**cell, **(verdict(at) if judged(cfg.policies) else {})})
    return {
        "config": {
            "shapes": shapes,
            "workers": list(cfg.workers),
            "fractions": list(cfg.fractions),
            "policies": list(cfg.policies),
            "load": cfg.load,
            "seed": cfg.seed,
            "trace": cfg.trace_path,
            "latency": dataclasses.asdict(cfg.latency),
        },
        "cells": cells,
        "results": rows,
    }


def _cell_key(row: dict[str, Any]) -> tuple[Any, ...]:
    order = [*SHAPES, "trace"]
    return (
        order.index(row["shape"]),
        row["num_workers"],
        row["fraction"],
        list(POLICIES).index(row["policy"]),
    )


def _missed(passed: bool) -> str:
    return "" if passed else " MISS"


SUMMARY_COLUMNS = (  # one row per judged cell
    Column("shape", "shape", align="<"),
    Column("workers", "num_workers"),
    Column("cap", "fraction", ".0%"),
    Column("pareto", lambda c: "yes" if c["pareto"] else "NO " + ",".join(c["dominated_by"]), align="<"),
    Column(
        "hit/bar (bar policy)",
        lambda c: f"{c['hit_ratio']:.3f} ({c['hit_bar_policy']}){_missed(c['hit_bar'])}",
        align="<",
    ),
    Column(
        "p99/best baseline",
        lambda c: f"{c['p99_ratio']:.3f} ({c['best_baseline_p99_policy']}){_missed(c['p99_bar'])}",
        align="<",
    ),
)


def judged(policies: Sequence[str]) -> bool:
    """Whether a matrix of ``policies`` judges ``affinity``: it and a baseline to set the bars."""
    return OURS in policies and any(p in BASELINES for p in policies)


def summary(payload: dict[str, Any]) -> str:
    """One line per cell: the verdict and the ratios behind it."""
    if not judged(payload["config"]["policies"]):
        return (
            f"no verdicts: the checks judge {OURS} against the baselines ({', '.join(BASELINES)}); "
            "replay it with at least one of them"
        )
    ok = sum(1 for c in payload["cells"] if c.get("ok"))
    return (
        tables.plain(SUMMARY_COLUMNS, payload["cells"])
        + f"\naffinity meets all three checks in {ok} of {len(payload['cells'])} cells"
    )


def plot(payload: dict[str, Any], path: str | Path) -> None:
    """Hit rate vs p99 TTFT per policy, one panel per shape; both relative to the cell's best,
    so cells of different scale share a panel (up and left is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["results"]
    shapes = payload["config"]["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 4.2), squeeze=False)
    markers = "osD^v<>ph*"
    for ax, shape in zip(axes[0], shapes, strict=True):
        cells = {(r["num_workers"], r["fraction"]) for r in rows if r["shape"] == shape}
        for i, policy in enumerate(payload["config"]["policies"]):
            xs, ys = [], []
            for cell in cells:
                at = [r for r in rows if r["shape"] == shape and (r["num_workers"], r["fraction"]) == cell]
                me = next(r for r in at if r["policy"] == policy)
                xs.append(me["p99_ttft_ms"] / min(r["p99_ttft_ms"] for r in at))
                ys.append(me["token_hit_rate"] / max(max(r["token_hit_rate"] for r in at), 1e-9))
            ours = policy == OURS
            ax.scatter(
                xs,
                ys,
                label=policy,
                marker="*" if ours else markers[i % len(markers)],
                s=140 if ours else 28,
                color="tab:red" if ours else None,
                zorder=3 if ours else 2,
                alpha=1.0 if ours else 0.7,
            )
        ax.set_xscale("log")
        ax.set_title(f"{shape} ({len(cells)} cells)")
        ax.set_xlabel("p99 TTFT / best p99 in cell (log)")
        ax.set_ylabel("token hit / best hit in cell")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
