"""Benchmark shapes: seeded, exactly sized, time ordered, with the structure each one promises;
the matrix verdict on hand-made rows."""

from __future__ import annotations

import pytest

from kvcache import ConfigError
from kvcache.costs import LatencyModel
from kvcache.lab.matrix import verdict
from kvcache.lab.shapes import SHAPES, ShapeConfig, generate, offered_load, scale_to_load
from kvcache.lab.trace import FORMAT_MOONCAKE, Trace


@pytest.mark.parametrize("shape", SHAPES)
def test_seeded_sized_ordered(shape: str) -> None:
    a = generate(ShapeConfig(shape, 120, seed=1))
    assert len(a) == 120
    assert a == generate(ShapeConfig(shape, 120, seed=1))
    assert a != generate(ShapeConfig(shape, 120, seed=2))
    stamps = [r.timestamp_ms for r in a]
    assert stamps == sorted(stamps)
    for r in a:
        assert r.block_ids is not None and len(r.block_ids) == -(-r.num_tokens // 512)


def test_rag_structure() -> None:
    reqs = generate(ShapeConfig("rag", 400, num_tenants=5, num_documents=50, seed=0))
    # Every request opens with its tenant's private system prompt (1-4 blocks), so at most
    # 5 distinct first blocks; documents (2-8 blocks each, 2-4 per request) follow.
    assert len({r.block_ids[0] for r in reqs if r.block_ids}) == 5
    for r in reqs:
        assert 1 + 4 <= len(r.block_ids or ()) <= 4 + 4 * 8 + 1
    # Random document order: some second-position blocks differ among same-first-block requests.
    assert len({r.block_ids[:5] for r in reqs if r.block_ids}) > 50


def test_long_agent_transcripts_grow() -> None:
    reqs = generate(ShapeConfig("long_agent", 200, seed=0))
    assert max(r.num_tokens for r in reqs) > 32 * 1024
    assert max(r.num_tokens for r in reqs) <= 64 * 1024 + 5000
    # a step re-sends the previous step's whole prompt: most requests extend an earlier one
    seen: set[tuple[int, ...]] = set()
    extending = 0
    for r in reqs:
        ids = r.block_ids or ()
        extending += any(ids[:n] in seen for n in range(2, len(ids)))
        seen.add(ids[:-1])
    assert extending > len(reqs) // 2


def test_scale_to_load() -> None:
    lat = LatencyModel()
    reqs = generate(ShapeConfig("rag", 300, seed=0))
    scaled = scale_to_load(reqs, 8, 0.5, lat)
    assert offered_load(scaled, 8, lat) == pytest.approx(0.5, rel=1e-3)
    assert [r.block_ids for r in scaled] == [r.block_ids for r in reqs]
    assert (
        Trace(scaled, FORMAT_MOONCAKE, 512).unique_blocks()
        == Trace(reqs, FORMAT_MOONCAKE, 512).unique_blocks()
    )
    with pytest.raises(ConfigError, match="load=0"):
        scale_to_load(reqs, 8, 0.0)


def test_bad_shape() -> None:
    with pytest.raises(ConfigError, match="shape='chat'"):
        ShapeConfig("chat")
    with pytest.raises(ConfigError, match="block_tokens=100"):
        ShapeConfig("rag", block_tokens=100)


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
