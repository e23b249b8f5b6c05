"""The router's index: precise (from events) and approximate (from decisions, with a TTL)."""

from __future__ import annotations

from kvcache import BlockRemoved, BlockStored
from kvcache.router.index import ApproxIndex, PreciseIndex

K = [bytes([i]) * 16 for i in range(6)]


def stored(*keys: bytes) -> list[BlockStored]:
    return [BlockStored(k, b"", i, "s") for i, k in enumerate(keys)]


def test_precise_overlap_counts_leading_keys() -> None:
    index = PreciseIndex()
    index.apply(0, stored(K[0], K[1], K[2]))
    index.apply(1, stored(K[0]))
    index.apply(2, stored(K[1], K[2]))  # no K[0]: holds no prefix of the request
    assert index.overlaps(K[:4], [0, 1, 2, 3], 0.0) == {0: 3, 1: 1, 2: 0, 3: 0}
    index.apply(0, [BlockRemoved(K[1], 1, "s")])
    assert index.overlaps(K[:4], [0, 1], 0.0) == {0: 1, 1: 1}
    index.remove_worker(0)
    assert index.overlaps(K[:4], [0, 1], 0.0) == {0: 0, 1: 1}
    assert index.num_keys(0) == 0 and index.num_keys(2) == 2
    assert set(index.holders) == {K[0], K[1], K[2]}


def test_approx_entries_expire() -> None:
    index = ApproxIndex(ttl_ms=100.0)
    index.record(0, K[:3], now_ms=0.0)
    index.record(1, K[:1], now_ms=50.0)
    assert index.overlaps(K[:3], [0, 1], 60.0) == {0: 3, 1: 1}
    assert index.overlaps(K[:3], [0, 1], 120.0) == {0: 0, 1: 1}
    index.record(1, K[4:5], now_ms=300.0)  # sweeps what expired
    assert set(index.holders) == {K[4]}
    index.remove_worker(1)
    assert index.holders == {}
