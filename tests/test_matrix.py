"""The matrix verdict on hand-made rows: pareto, the hit-rate bar among the fast policies, the p99 bar."""

from __future__ import annotations

import pytest

from kvcache.lab.matrix import verdict


def _row(policy: str, hit: float, p99: float) -> dict[str, object]:
    return {"policy": policy, "token_hit_rate": hit, "p99_ttft_ms": p99}


def test_verdict() -> None:
    rows = [_row("lpm", 0.40, 9000.0), _row("sglang", 0.30, 1100.0), _row("affinity", 0.29, 1000.0)]
    v = verdict(rows)
    # lpm's tail is 9x the best: outside the 1.5x band, so sglang sets the hit bar (0.29/0.30)
    assert v["ok"] and v["hit_bar_policy"] == "sglang" and v["hit_ratio"] == pytest.approx(0.29 / 0.30)
    rows = [_row("sglang", 0.30, 900.0), _row("affinity", 0.25, 1000.0)]
    v = verdict(rows)
    assert v["dominated_by"] == ["sglang"] and not v["pareto"] and not v["hit_bar"] and not v["p99_bar"]
    assert v["p99_ratio"] == pytest.approx(1000.0 / 900.0)


def test_verdict_ignores_policies_that_are_not_baselines() -> None:
    """A candidate replayed in the cell (``kvcache matrix --policy``) sets neither bar."""
    rows = [_row("lpm", 0.40, 9000.0), _row("sglang", 0.30, 1100.0), _row("affinity", 0.29, 1000.0)]
    with_candidate = [*rows, _row("dynamo_band", 0.50, 500.0)]
    assert verdict(with_candidate) == verdict(rows)
