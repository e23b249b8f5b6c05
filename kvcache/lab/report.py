"""Metrics of a replay: hit rates, prefill work, modelled latency, throughput, load balance,
per-worker breakdown, cache upper bounds; as a dict (JSON keys follow ``vllm bench serve``
where one exists), a text table, and a plot.

Definitions: a token hit is a prompt token whose KV was reused (from the device pool, or
loaded from a lower tier); a block hit is a full prompt block found in the device pool. TTFT
is first token minus arrival (a request re-routed after a failure keeps its arrival). Load
imbalance is max/mean over workers of prompt tokens computed, over the whole run and per 60 s
window (windows where no worker computed anything are skipped). The upper bounds replay the
trace through one shared cache (same total capacity, then unbounded) with no queueing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvcache.cache.config import CacheConfig
from kvcache.cache.manager import BlockManager, Prompt
from kvcache.lab import tables
from kvcache.lab.replay import ReplayResult
from kvcache.lab.tables import Column
from kvcache.lab.trace import Trace

WINDOW_MS = 60_000.0


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def _imbalance(tokens: Sequence[float]) -> float:
    mean = sum(tokens) / len(tokens)
    return max(tokens) / mean if mean else 1.0


def metrics(result: ReplayResult) -> dict[str, Any]:
    """Everything the table, the JSON and the plot show for one replay."""
    jobs = [j for j in result.jobs if j.finish_ms > 0.0 or j.first_token_ms > 0.0]
    cfg = result.config
    input_tokens = sum(j.request.num_tokens for j in result.jobs)
    output_tokens = sum(j.request.output_tokens for j in jobs)
    cached = sum(j.cached_tokens for j in jobs)
    loaded = sum(j.loaded_tokens for j in jobs)
    computed = sum(j.prefill_tokens for j in jobs)
    ttft = np.array([j.first_token_ms - j.arrival_ms for j in jobs], dtype=np.float64)
    e2el = np.array([j.finish_ms - j.arrival_ms for j in jobs], dtype=np.float64)
    start = min((j.arrival_ms for j in result.jobs), default=0.0)
    end = max((j.finish_ms for j in jobs), default=start)
    duration_s = max(end - start, 1e-9) / 1000.0
    per_worker: list[dict[str, Any]] = []
    for w in range(cfg.num_workers):
        mine = [j for j in jobs if j.worker_id == w]
        prompt = sum(j.request.num_tokens for j in mine)
        hit = sum(j.cached_tokens + j.loaded_tokens for j in mine)
        per_worker.append(
            {
                "worker_id": w,
                "completed": len(mine),
                "input_tokens": prompt,
                "prefill_tokens": sum(j.prefill_tokens for j in mine),
                "token_hit_rate": hit / prompt if prompt else 0.0,
            }
        )
    windows: dict[int, list[float]] = {}
    for j in jobs:
        row = windows.setdefault(int((j.start_ms - start) // WINDOW_MS), [0.0] * cfg.num_workers)
        row[j.worker_id] += j.prefill_tokens
    window_imbalance = [_imbalance(row) for row in windows.values() if any(row)]
    return {
        "policy": cfg.policy,
        "mode": cfg.mode,
        "num_workers": cfg.num_workers,
        "capacity_blocks": cfg.capacity_blocks,
        "completed": len(jobs),
        "lost": result.num_lost,
        "rerouted": result.num_rerouted,
        "duration": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(jobs) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "token_hit_rate": (cached + loaded) / input_tokens if input_tokens else 0.0,
        "block_hit_rate": sum(j.hit_blocks for j in jobs) / max(1, sum(j.query_blocks for j in jobs)),
        "loaded_tokens": loaded,
        "prefill_tokens_computed": computed,
        "prefill_tokens_saved": cached + loaded,
        "mean_ttft_ms": float(ttft.mean()) if len(ttft) else 0.0,
        "median_ttft_ms": _pct(ttft, 50),
        "p90_ttft_ms": _pct(ttft, 90),
        "p99_ttft_ms": _pct(ttft, 99),
        "mean_e2el_ms": float(e2el.mean()) if len(e2el) else 0.0,
        "p99_e2el_ms": _pct(e2el, 99),
        "load_imbalance": _imbalance([w["prefill_tokens"] for w in per_worker]),
        "load_imbalance_60s_mean": float(np.mean(window_imbalance)) if window_imbalance else 1.0,
        "load_imbalance_60s_max": max(window_imbalance, default=1.0),
        "per_worker": per_worker,
        "wall_s": result.wall_s,
    }


def upper_bounds(
    trace: Trace, prompts: Sequence[Prompt], block_size: int, total_blocks: int
) -> dict[str, float]:
    """Token hit rate of one shared cache of ``total_blocks`` blocks, and of an unbounded one,
    each serving the trace one request at a time in arrival order."""
    infinite = sum(-(-p.num_tokens // block_size) for p in prompts) + 1
    out = {}
    for name, num_blocks in (
        ("shared_cache_token_hit_rate", total_blocks),
        ("infinite_cache_token_hit_rate", infinite),
    ):
        manager = BlockManager(CacheConfig(num_blocks=num_blocks, block_size=block_size))
        hit = total = 0
        for i, (req, prompt) in enumerate(zip(trace.requests, prompts, strict=True)):
            if -(-prompt.num_tokens // block_size) > num_blocks:
                total += req.num_tokens  # cannot be held at all
                continue
            hit += manager.allocate(i, prompt).num_cached_tokens
            total += req.num_tokens
            manager.free(i)
        out[name] = hit / total if total else 0.0
    return out


def _mtok(key: str) -> Callable[[dict[str, Any]], float]:
    return lambda row: row[key] / 1e6


COLUMNS = (  # the terminal table; Markdown (MARKDOWN_COLUMNS) spells the titles out
    Column("policy", "policy", align="<"),
    Column("tok hit", "token_hit_rate", ".1%"),
    Column("blk hit", "block_hit_rate", ".1%"),
    Column("prefill Mtok", _mtok("prefill_tokens_computed"), ".2f"),
    Column("TTFT mean", "mean_ttft_ms", ".0f"),
    Column("p50", "median_ttft_ms", ".0f"),
    Column("p90", "p90_ttft_ms", ".0f"),
    Column("p99 ms", "p99_ttft_ms", ".0f"),
    Column("req/s", "request_throughput", ".2f"),
    Column("imbal", "load_imbalance", ".2f"),
    Column("60s mean", "load_imbalance_60s_mean", ".2f"),
    Column("60s max", "load_imbalance_60s_max", ".2f"),
    Column("lost", "lost", "d"),
)
MARKDOWN_COLUMNS = tables.retitled(
    COLUMNS,
    (
        "policy",
        "token hit",
        "block hit",
        "prefill Mtok",
        "mean TTFT ms",
        "p50",
        "p90",
        "p99 TTFT ms",
        "req/s",
        "imbalance",
        "60 s mean",
        "60 s worst",
        "lost",
    ),
)
WORKER_COLUMNS = (
    Column("worker", "worker_id"),
    Column("completed", "completed"),
    Column("input Mtok", _mtok("input_tokens"), ".2f"),
    Column("prefill Mtok", _mtok("prefill_tokens"), ".2f"),
    Column("token hit", "token_hit_rate", ".1%"),
)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table, one row per replay (TTFT in ms; imbalance = max/mean prefill tokens
    per worker, over the run, then the mean and the worst of the 60 s windows)."""
    return tables.plain(COLUMNS, rows)


def worker_table(row: dict[str, Any]) -> str:
    """One policy's per-worker breakdown, the policy's name leading the titles."""
    lead = f"  {row['policy']}: "
    lines = tables.plain(WORKER_COLUMNS, row["per_worker"]).splitlines()
    return "\n".join([lead + lines[0], *(" " * len(lead) + line for line in lines[1:])])


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The same table in Markdown, for docs."""
    return tables.markdown(MARKDOWN_COLUMNS, rows)


OWN_POLICY = "affinity"  # kvcache's policy: marked in every plot, the rest are baselines
OWN_COLOR, BASELINE_COLOR = "tab:red", "tab:blue"
BASELINE_LINE_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:gray"]


def policy_colors(names: Sequence[str]) -> list[str]:
    """Bar colours: kvcache's own policy (with or without tiers) stands out from the baselines."""
    return [OWN_COLOR if n.split("+")[0] == OWN_POLICY else BASELINE_COLOR for n in names]


def own_policy_handles(tiers: bool = False) -> list[Any]:
    """Legend entries naming which colour is kvcache's policy (and which hatch means spill tiers)."""
    from matplotlib.patches import Patch

    handles = [
        Patch(color=OWN_COLOR, label=f"{OWN_POLICY} (kvcache)"),
        Patch(color=BASELINE_COLOR, label="baselines"),
    ]
    if tiers:
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="//", label="with spill tiers"))
    return handles


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Token hit rate and p99 TTFT per policy at one capacity (the middle one of a sweep), as
    horizontal bars so any number of policies stays readable; with several capacities, a third
    panel of hit rate against capacity, ticked at the capacities replayed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    capacities = sorted({r["capacity_blocks"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    sweep = len(capacities) > 1
    at = [r for r in rows if r["capacity_blocks"] == capacities[len(capacities) // 2]]
    names = [r["policy"] for r in at]
    height = max(3.6, 0.3 * len(names) + 1.6)
    fig, axes = plt.subplots(
        1, 3 if sweep else 2, figsize=(15 if sweep else 11, height), layout="constrained"
    )
    tiers = any(n.endswith("+tiers") for n in names)
    hatches = ["//" if n.endswith("+tiers") else "" for n in names]
    y = list(range(len(names)))
    for ax, values, label in (
        (axes[0], [100 * r["token_hit_rate"] for r in at], "token hit rate (%)"),
        (axes[1], [r["p99_ttft_ms"] / 1000 for r in at], "p99 TTFT (s, modelled)"),
    ):
        ax.barh(y, values, color=policy_colors(names), hatch=hatches, edgecolor="white")
        ax.set_yticks(y, names if ax is axes[0] else [""] * len(names))
        ax.invert_yaxis()  # first policy on top, in the order the table prints
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_title("token hit rate (higher is better)")
    axes[1].set_title("p99 TTFT (lower is better)")
    handles = own_policy_handles(tiers)
    fig.suptitle(
        f"{at[0]['num_workers']} workers x {at[0]['capacity_blocks']} blocks per worker"
        + (" (middle of the sweep)" if sweep else "")
    )
    if sweep:
        ax = axes[2]
        others = iter(BASELINE_LINE_COLORS * 3)
        for name in policies:
            pts = sorted((r["capacity_blocks"], r["token_hit_rate"]) for r in rows if r["policy"] == name)
            own = name.split("+")[0] == OWN_POLICY
            ax.plot(
                [c for c, _ in pts],
                [100 * h for _, h in pts],
                marker="o",
                label=f"{name} (kvcache)" if own else name,
                color=OWN_COLOR if own else next(others),
                linewidth=2.5 if own else 1.2,
                zorder=3 if own else 2,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(capacities, [str(c) for c in capacities])
        ax.minorticks_off()
        ax.set_xlabel("capacity per worker (blocks)")
        ax.set_ylabel("token hit rate (%)")
        ax.set_title("token hit rate vs capacity")
        handles += ax.get_legend_handles_labels()[0]
    # below the panels, outside them: a legend inside would cover bars or lines
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 9), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
