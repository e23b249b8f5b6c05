"""The router's index: precise (from events) and approximate (from decisions, with a TTL)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
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
    # sparse: workers 2 and 3 hold no prefix of the request, so they are absent (overlap 0)
    assert index.overlaps(K[:4], 0.0) == {0: 3, 1: 1}
    index.apply(0, [BlockRemoved(K[1], 1, "s")])
    assert index.overlaps(K[:4], 0.0) == {0: 1, 1: 1}
    index.remove_worker(0)
    assert index.overlaps(K[:4], 0.0) == {1: 1}
    assert index.num_keys(0) == 0 and index.num_keys(2) == 2
    assert set(index.holders) == {K[0], K[1], K[2]}


def test_approx_entries_expire() -> None:
    index = ApproxIndex(ttl_ms=100.0)
    index.record(0, K[:3], now_ms=0.0)
    index.record(1, K[:1], now_ms=50.0)
    assert index.overlaps(K[:3], 60.0) == {0: 3, 1: 1}
    assert index.overlaps(K[:3], 120.0) == {1: 1}  # worker 0's entries expired: overlap 0, absent
    index.record(1, K[4:5], now_ms=300.0)  # sweeps what expired
    assert set(index.holders) == {K[4]}
    index.remove_worker(1)
    assert index.holders == {}


def brute_overlap(held: set[bytes], keys: list[bytes]) -> int:
    n = 0
    while n < len(keys) and keys[n] in held:
        n += 1
    return n


def brute_overlaps(held: dict[int, set[bytes]], keys: list[bytes]) -> dict[int, int]:
    """Every worker with a non-zero overlap: the sparse answer both indexes give."""
    return {w: n for w, keys_held in held.items() if (n := brute_overlap(keys_held, keys))}


def test_precise_overlap_at_fleet_scale_decodes_every_layer() -> None:
    """300 workers (past the Python decoding threshold), each holding its own prefix depth."""
    index = PreciseIndex()
    keys = [bytes([1, i]) * 8 for i in range(40)]
    held = {w: set(keys[: w % 41]) for w in range(300)}
    for w, mine in held.items():
        index.apply(w, stored(*keys[: len(mine)]))
    assert index.overlaps(keys, 0.0) == brute_overlaps(held, keys)
    slots, depths = index.overlap_slots(keys, 0.0)
    assert sorted(zip(slots.tolist(), depths.tolist(), strict=True)) == sorted(
        (index.slot(w), n) for w, n in brute_overlaps(held, keys).items()
    )
    assert index.overlaps(keys[:1], 0.0) == {w: 1 for w in range(300) if w % 41}
    assert index.overlaps([], 0.0) == {} and index.overlaps([K[5]], 0.0) == {}


def test_precise_removed_worker_slot_is_reused_by_the_next_worker() -> None:
    index = PreciseIndex()
    index.apply(0, stored(K[0], K[1]))
    index.apply(1, stored(K[0]))
    index.remove_worker(0)
    index.apply(7, stored(K[0], K[1], K[2]))  # takes worker 0's slot: no stale bit may count
    assert index.overlaps(K[:3], 0.0) == {1: 1, 7: 3}
    index.remove_worker(7)
    index.remove_worker(7)  # twice, or an unknown worker: nothing to forget
    assert index.overlaps(K[:3], 0.0) == {1: 1}
    assert set(index.holders) == {K[0]}


def test_precise_removing_a_key_a_worker_never_stored_keeps_other_holders() -> None:
    index = PreciseIndex()
    index.apply(0, stored(K[0]))
    index.apply(1, [BlockRemoved(K[0], 0, "s")])
    assert index.overlaps(K[:1], 0.0) == {0: 1}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 39), st.integers(0, 7), st.booleans()), max_size=200),
    st.lists(st.integers(0, 7), max_size=8),
)
def test_precise_overlap_matches_brute_force(ops: list[tuple[int, int, bool]], request: list[int]) -> None:
    """40 workers, so both decoders (per bit and numpy) meet arbitrary holdings."""
    index = PreciseIndex()
    held: dict[int, set[bytes]] = {w: set() for w in range(40)}
    for worker, key, store in ops:
        k = bytes([key]) * 16
        if store:
            index.apply(worker, [BlockStored(k, b"", 0, "s")])
            held[worker].add(k)
        else:
            index.apply(worker, [BlockRemoved(k, 0, "s")])
            held[worker].discard(k)
    keys = [bytes([k]) * 16 for k in request]
    want = brute_overlaps(held, keys)
    assert index.overlaps(keys, 0.0) == want
    slots, depths = index.overlap_slots(keys, 0.0)
    assert dict(zip(slots.tolist(), depths.tolist(), strict=True)) == {
        index.slot(w): n for w, n in want.items()
    }


@pytest.mark.parametrize("name", [lambda w: f"w{w}", lambda w: ("host", w)])
def test_precise_overlap_keeps_worker_ids_as_given(name: Callable[[int], object]) -> None:
    """A front names its workers (strings, tuples); both decoders hand back the same ids."""
    index = PreciseIndex()
    names = [name(w) for w in range(30)]
    for w, name in enumerate(names):
        index.apply(name, stored(*K[: 1 + w % 3]))  # type: ignore[arg-type]
    assert index.overlaps(K[:3], 0.0) == {name: 1 + w % 3 for w, name in enumerate(names)}
    assert index.overlaps(K[2:3], 0.0) == {name: 1 for w, name in enumerate(names) if w % 3 == 2}
