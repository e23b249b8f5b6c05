"""The cost rule: load from a tier only while it beats recomputing, with exact figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcache.costs import LatencyModel
from kvcache.errors import ConfigError, TierError
from kvcache.tiers import TransferModel, best_load_prefix

MIB = 2**20
FAST = TransferModel(bandwidth_bytes_per_s=50e9, base_latency_ms=0.01)  # pinned host memory
DISK = TransferModel(bandwidth_bytes_per_s=1e9, base_latency_ms=0.1, per_block_ms=0.02)


def cost(ms_per_token: float, ms_per_token_per_ctx_token: float = 0.0) -> LatencyModel:
    """A latency model whose per-token prefill terms are these (the rule reads nothing else)."""
    return LatencyModel(
        prefill_ms_per_token=ms_per_token, prefill_ms_per_token_per_ctx_token=ms_per_token_per_ctx_token
    )


def test_recompute_cost_includes_attention_over_context() -> None:
    p = cost(0.01, 1e-6)
    # 16 tokens after 100 cached: 16*0.01 + 1e-6 * 16 * (100 + 16/2)
    assert p.compute_ms(16, 100) == pytest.approx(0.16 + 1e-6 * 1728)
    assert p.compute_ms(0, 100) == 0.0
    # The step overheads are not part of what a cached block saves: the rule ignores them.
    assert p.prefill_ms(16, 100) == pytest.approx(p.prefill_base_ms + p.compute_ms(16, 100))


def test_the_rule_reads_the_calibrated_latency_model(tmp_path: Path) -> None:
    # The same JSON the replay and the server read drives the tier decision.
    path = tmp_path / "latency.json"
    cost(1 / 16).to_json(path)
    assert best_load_prefix([FAST] * 2, MIB, 16, 0, LatencyModel.from_json(path))[0] == 2
    cost(1e-6).to_json(path)
    assert best_load_prefix([FAST] * 2, MIB, 16, 0, LatencyModel.from_json(path)) == (0, 0.0)


def test_fast_tier_loads_everything_it_holds() -> None:
    p = cost(0.004)  # ~4 us/token of GPU prefill (FACTS, 0.5B model)
    n, saved = best_load_prefix([FAST] * 8, MIB, 16, 0, p)
    assert n == 8
    assert saved == pytest.approx(8 * 16 * 0.004 - (0.01 + 8 * MIB / 50e9 * 1e3))


def test_slow_tier_is_declined_when_recompute_is_cheaper() -> None:
    p = cost(0.004)
    # 1 MiB over 1 GB/s ~ 1.05 ms per block vs 0.064 ms to recompute 16 tokens
    assert best_load_prefix([DISK] * 8, MIB, 16, 0, p) == (0, 0.0)


def test_mixed_sources_stop_where_loading_stops_paying() -> None:
    # Recompute 1 ms per block; FAST costs ~0.03 ms per block; DISK ~1.07 ms per block.
    p = cost(1 / 16)
    n, saved = best_load_prefix([FAST, FAST, DISK, DISK], MIB, 16, 0, p)
    assert n == 2
    assert saved == pytest.approx(2.0 - FAST.transfer_ms(2, 2 * MIB))


def test_long_context_makes_loading_worth_it() -> None:
    # Attention over a long cached context makes recompute dearer than the disk read.
    p = cost(0.004, 1e-6)
    assert best_load_prefix([DISK] * 4, MIB, 16, 0, p)[0] == 0
    assert best_load_prefix([DISK] * 4, MIB, 16, 100_000, p)[0] == 4


def test_bad_costs_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"prefill_ms_per_token=-1\.0 must be >= 0"):
        cost(-1.0)
    with pytest.raises(TierError, match="bandwidth_bytes_per_s=0"):
        TransferModel(bandwidth_bytes_per_s=0)
