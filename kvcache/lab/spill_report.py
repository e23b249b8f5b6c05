"""What the simulated tiers add to a trace replay: hit rate by tier, and the change in hit rate
and TTFT against the same replay with the device pool alone (G1-only, same GPU capacity).

Takes the router report's metric dicts (``kvcache.lab.report.metrics``) and a ``SimTiers``;
only formats numbers. Token hit rates here count tokens of blocks loaded from each tier over all
prompt tokens, the same denominator as the report's ``token_hit_rate``; the tokens a worker
loaded are shared among tiers in proportion to the blocks each one served.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvcache.lab import tables
from kvcache.lab.sim_tiers import TIER_NAMES, SimTiers
from kvcache.lab.tables import Column


def tier_metrics(sim: SimTiers, row: dict[str, Any]) -> dict[str, Any]:
    """Per-tier figures of one replay with tiers; ``row`` is its report metrics."""
    input_tokens = max(1, int(row["total_input_tokens"]))
    occupancy = sim.occupancy()
    blocks = sum(sim.stats[n].blocks_hit for n in TIER_NAMES)
    # The worker loads at most up to the prompt's last token: share its loaded tokens by blocks.
    loaded_share = row["loaded_tokens"] / input_tokens / blocks if blocks else 0.0
    out: dict[str, Any] = {
        "device_token_hit_rate": row["token_hit_rate"] - row["loaded_tokens"] / input_tokens
    }
    for name in TIER_NAMES:
        s = sim.stats[name]
        out[name] = {
            "token_hit_rate": s.blocks_hit * loaded_share,
            "blocks_hit": s.blocks_hit,
            "cross_worker_hits": s.cross_worker_hits,
            "prestaged": s.prestaged,
            "blocks_in": s.blocks_in,
            "evictions": s.evictions,
            "transfer_ms": s.transfer_ms,
            "occupancy_blocks": occupancy[name],
        }
    out["blocks_declined"] = sim.blocks_declined
    out["prestaged_blocks"] = sum(sim.stats[n].prestaged for n in TIER_NAMES)
    out["sizes"] = {"g2": sim.sizes.g2, "g3": sim.sizes.g3, "icms": sim.sizes.icms}
    out["kv_bytes_per_token"] = sim.kv_bytes_per_token
    return out


def _pairs(rows: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    base = {(r["policy"], r["capacity_blocks"]): r for r in rows if "tiers" not in r}
    return [
        (base[(r["policy"].removesuffix("+tiers"), r["capacity_blocks"])], r)
        for r in rows
        if "tiers" in r and (r["policy"].removesuffix("+tiers"), r["capacity_blocks"]) in base
    ]


Pair = tuple[dict[str, Any], dict[str, Any]]  # (G1-only row, the same replay with tiers)


def _tier_hit(tier: str) -> Callable[[Pair], float]:
    return lambda p: p[1]["tiers"][tier]["token_hit_rate"]


def _p99_change(p: Pair) -> str:
    return _change(p[0]["p99_ttft_ms"], p[1]["p99_ttft_ms"])


def _mean_change(p: Pair) -> str:
    return _change(p[0]["mean_ttft_ms"], p[1]["mean_ttft_ms"])


COLUMNS = (  # the terminal table; Markdown (MARKDOWN_COLUMNS) spells the titles out
    Column("policy", lambda p: p[0]["policy"], align="<"),
    Column("G1-only hit", lambda p: p[0]["token_hit_rate"], ".1%"),
    Column("tiers hit", lambda p: p[1]["token_hit_rate"], ".1%"),
    Column("G1", lambda p: p[1]["tiers"]["device_token_hit_rate"], ".1%"),
    Column("G2", _tier_hit("g2"), ".1%"),
    Column("G3", _tier_hit("g3"), ".1%"),
    Column("ICMS", _tier_hit("icms"), ".1%"),
    Column("x-worker", lambda p: p[1]["tiers"]["icms"]["cross_worker_hits"], "d"),
    Column("staged", lambda p: p[1]["tiers"]["prestaged_blocks"], "d"),
    Column("p99 G1-only", lambda p: p[0]["p99_ttft_ms"], ".0f"),
    Column("p99 tiers", lambda p: p[1]["p99_ttft_ms"], ".0f"),
    Column("p99 change", _p99_change),
    Column("mean change", _mean_change),
)
MARKDOWN_COLUMNS = tables.retitled(
    COLUMNS,
    (
        "policy",
        "G1-only token hit",
        "with tiers",
        "from G1",
        "G2",
        "G3",
        "ICMS",
        "ICMS cross-worker blocks",
        "prestaged blocks",
        "p99 TTFT G1-only ms",
        "p99 TTFT tiers ms",
        "p99 change",
        "mean TTFT change",
    ),
)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per policy: G1-only vs with tiers, hit rate by tier, p99 TTFT change."""
    return tables.plain(COLUMNS, _pairs(rows))


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The same table in Markdown, for docs."""
    return tables.markdown(MARKDOWN_COLUMNS, _pairs(rows))


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.0%}" if before else "n/a"


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Token hit rate by tier (stacked, G1-only beside it) and p99 TTFT, per policy, as horizontal
    bars (readable for any number of policies); kvcache's own policy is named in its tick label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvcache.lab.report import OWN_POLICY

    pairs = _pairs(rows)
    names = [f"{b['policy']} (kvcache)" if b["policy"] == OWN_POLICY else b["policy"] for b, _ in pairs]
    y = range(len(pairs))
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(12, max(3.6, 0.45 * len(pairs) + 1.8)), sharey=True, layout="constrained"
    )
    ax1.barh(
        [i - 0.2 for i in y], [100 * b["token_hit_rate"] for b, _ in pairs], 0.4, label="G1-only", color="0.6"
    )
    left = [0.0] * len(pairs)
    for label in ("G1", *TIER_NAMES):
        values = [
            100
            * (t["tiers"]["device_token_hit_rate"] if label == "G1" else t["tiers"][label]["token_hit_rate"])
            for _, t in pairs
        ]
        ax1.barh([i + 0.2 for i in y], values, 0.4, left=left, label=f"tiers: {label.upper()}")
        left = [b + v for b, v in zip(left, values, strict=True)]
    ax1.set_xlabel("token hit rate (%)")
    ax1.set_title("token hit rate by tier (higher is better)")
    ax2.barh(
        [i - 0.2 for i in y], [b["p99_ttft_ms"] / 1000 for b, _ in pairs], 0.4, label="G1-only", color="0.6"
    )
    ax2.barh(
        [i + 0.2 for i in y],
        [t["p99_ttft_ms"] / 1000 for _, t in pairs],
        0.4,
        label="with tiers (p99 TTFT)",
        color="0.2",
    )
    ax2.set_xlabel("p99 TTFT (s, modelled)")
    ax2.set_title("p99 TTFT (lower is better)")
    ax1.set_yticks(list(y), names)
    ax1.invert_yaxis()  # first policy on top, in the order the table prints
    for ax in (ax1, ax2):
        ax.grid(axis="x", alpha=0.3)
    first = pairs[0][1] if pairs else {}
    fig.suptitle(
        f"{first.get('num_workers', '?')} workers x {first.get('capacity_blocks', '?')} device blocks; "
        + _sizes_text(first.get("tiers", {}).get("sizes", {}))
    )
    handles, labels = ax1.get_legend_handles_labels()
    ttft_handles, ttft_labels = ax2.get_legend_handles_labels()
    # below the panels, outside them: a legend inside would cover bars
    fig.legend(
        handles + ttft_handles[1:], labels + ttft_labels[1:], loc="outside lower center", ncol=6, fontsize=8
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sizes_text(sizes: dict[str, int]) -> str:
    """``{'g2': 1100, 'g3': 4400, 'icms': 4400}`` -> ``G2 1,100 + G3 4,400 blocks per worker, ICMS
    4,400 shared``: how a reader says it, not how Python prints a dict."""
    own = [f"{name.upper()} {sizes[name]:,}" for name in ("g2", "g3") if sizes.get(name)]
    text = (" + ".join(own) + " blocks per worker") if own else "no per-worker tiers"
    return text + (f", ICMS {sizes['icms']:,} shared" if sizes.get("icms") else "")
