"""What the simulated tiers add to a trace replay: hit rate by tier, and the change in hit rate
and TTFT against the same replay with the device pool alone (G1-only, same GPU capacity).

Takes the router report's metric dicts (``kvcache.router.report.metrics``) and a ``SimTiers``;
only formats numbers. Token hit rates here count tokens of blocks loaded from each tier over all
prompt tokens, the same denominator as the report's ``token_hit_rate``; the tokens a worker
loaded are shared among tiers in proportion to the blocks each one served.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvcache.tiers.sim import TIER_NAMES, SimTiers


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


def table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per policy: G1-only vs with tiers, hit rate by tier, p99 TTFT change."""
    head = (
        f"{'policy':<13}{'G1-only hit':>12}{'tiers hit':>10}{'G1':>7}{'G2':>7}{'G3':>7}{'ICMS':>7}"
        f"{'x-worker':>9}{'staged':>8}{'p99 G1-only':>12}{'p99 tiers':>10}{'p99 change':>11}"
        f"{'mean change':>12}"
    )
    lines = [head]
    for base, tiered in _pairs(rows):
        t = tiered["tiers"]
        device = t["device_token_hit_rate"]
        lines.append(
            f"{base['policy']:<13}{base['token_hit_rate']:>12.1%}{tiered['token_hit_rate']:>10.1%}"
            f"{device:>7.1%}{t['g2']['token_hit_rate']:>7.1%}{t['g3']['token_hit_rate']:>7.1%}"
            f"{t['icms']['token_hit_rate']:>7.1%}{t['icms']['cross_worker_hits']:>9d}"
            f"{t['prestaged_blocks']:>8d}{base['p99_ttft_ms']:>12.0f}{tiered['p99_ttft_ms']:>10.0f}"
            f"{_change(base['p99_ttft_ms'], tiered['p99_ttft_ms']):>11}"
            f"{_change(base['mean_ttft_ms'], tiered['mean_ttft_ms']):>12}"
        )
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| policy | G1-only token hit | with tiers | from G1 | G2 | G3 | ICMS | ICMS cross-worker blocks "
        "| prestaged blocks | p99 TTFT G1-only ms | p99 TTFT tiers ms | p99 change | mean TTFT change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for base, tiered in _pairs(rows):
        t = tiered["tiers"]
        device = t["device_token_hit_rate"]
        lines.append(
            f"| {base['policy']} | {base['token_hit_rate']:.1%} | {tiered['token_hit_rate']:.1%} | "
            f"{device:.1%} | {t['g2']['token_hit_rate']:.1%} | {t['g3']['token_hit_rate']:.1%} | "
            f"{t['icms']['token_hit_rate']:.1%} | {t['icms']['cross_worker_hits']} | "
            f"{t['prestaged_blocks']} | {base['p99_ttft_ms']:.0f} | {tiered['p99_ttft_ms']:.0f} | "
            f"{_change(base['p99_ttft_ms'], tiered['p99_ttft_ms'])} | "
            f"{_change(base['mean_ttft_ms'], tiered['mean_ttft_ms'])} |"
        )
    return "\n".join(lines)


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.0%}" if before else "n/a"


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Token hit rate by tier (stacked, G1-only beside it) and p99 TTFT, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = _pairs(rows)
    names = [base["policy"] for base, _ in pairs]
    x = range(len(pairs))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax1.bar(
        [i - 0.2 for i in x], [100 * b["token_hit_rate"] for b, _ in pairs], 0.4, label="G1-only", color="0.6"
    )
    bottom = [0.0] * len(pairs)
    for label in ("G1", *TIER_NAMES):
        values = [
            100
            * (t["tiers"]["device_token_hit_rate"] if label == "G1" else t["tiers"][label]["token_hit_rate"])
            for _, t in pairs
        ]
        ax1.bar([i + 0.2 for i in x], values, 0.4, bottom=bottom, label=f"tiers: {label.upper()}")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax1.set_ylabel("token hit rate (%)")
    ax1.legend(fontsize=8)
    ax2.bar(
        [i - 0.2 for i in x], [b["p99_ttft_ms"] / 1000 for b, _ in pairs], 0.4, label="G1-only", color="0.6"
    )
    ax2.bar([i + 0.2 for i in x], [t["p99_ttft_ms"] / 1000 for _, t in pairs], 0.4, label="with tiers")
    ax2.set_ylabel("p99 TTFT (s, modelled)")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(list(x), names, rotation=30)
    first = pairs[0][1] if pairs else {}
    fig.suptitle(
        f"{first.get('num_workers', '?')} workers x {first.get('capacity_blocks', '?')} device blocks; "
        f"tiers {first.get('tiers', {}).get('sizes', {})}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
