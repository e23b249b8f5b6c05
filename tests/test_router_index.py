"""The router's index: precise (from events) and approximate (from decisions, with a TTL)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

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


def brute_overlap(held: set[bytes], keys: list[bytes]) -> int:
    n = 0
    while n < len(keys) and keys[n] in held:
        n += 1
    return n


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 7), st.booleans()), max_size=60),
    st.lists(st.integers(0, 7), max_size=8),
)
def test_precise_overlap_matches_brute_force(ops: list[tuple[int, int, bool]], request: list[int]) -> None:
    index = PreciseIndex()
    held: dict[int, set[bytes]] = {w: set() for w in range(4)}
    for worker, key, store in ops:
        k = bytes([key]) * 16
        if store:
            index.apply(worker, [BlockStored(k, b"", 0, "s")])
            held[worker].add(k)
        else:
            index.apply(worker, [BlockRemoved(k, 0, "s")])
            held[worker].discard(k)
    keys = [bytes([k]) * 16 for k in request]
    assert index.overlaps(keys, range(4), 0.0) == {w: brute_overlap(held[w], keys) for w in range(4)}
