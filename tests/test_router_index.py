"""The router's index: precise (from events) and approximate (from decisions, with a TTL)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache import BlockRemoved, BlockStored, ConfigError
from kvcache.router import Router, RouteRequest
from kvcache.router.index import ApproxIndex, IndexChange, PreciseIndex

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


def by_slot(index: PreciseIndex, overlaps: dict[int, int]) -> list[int]:
    """``overlaps`` as ``overlap_by_slot`` gives it: a list by slot, 0 where nothing matches."""
    out = [0] * index.num_slots
    for w, n in overlaps.items():
        out[index.slot(w)] = n
    return out


def test_precise_overlap_at_fleet_scale_decodes_every_layer() -> None:
    """300 workers (past the Python decoding threshold), each holding its own prefix depth."""
    index = PreciseIndex()
    keys = [bytes([1, i]) * 8 for i in range(40)]
    held = {w: set(keys[: w % 41]) for w in range(300)}
    for w, mine in held.items():
        index.apply(w, stored(*keys[: len(mine)]))
    assert index.overlaps(keys, 0.0) == brute_overlaps(held, keys)
    assert index.overlap_by_slot(keys, 0.0).tolist() == by_slot(index, brute_overlaps(held, keys))
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
    assert index.overlap_by_slot(keys, 0.0).tolist() == by_slot(index, want)


@pytest.mark.parametrize("name", [lambda w: f"w{w}", lambda w: ("host", w)])
def test_precise_overlap_keeps_worker_ids_as_given(name: Callable[[int], object]) -> None:
    """A front names its workers (strings, tuples); both decoders hand back the same ids."""
    index = PreciseIndex()
    names = [name(w) for w in range(30)]
    for w, name in enumerate(names):
        index.apply(name, stored(*K[: 1 + w % 3]))  # type: ignore[arg-type]
    assert index.overlaps(K[:3], 0.0) == {name: 1 + w % 3 for w, name in enumerate(names)}
    assert index.overlaps(K[2:3], 0.0) == {name: 1 for w, name in enumerate(names) if w % 3 == 2}


# ---- the bound: each worker's keys in least-recently-stored order, at most its capacity -----


def test_bounded_worker_drops_its_least_recently_stored_keys_first() -> None:
    index = PreciseIndex(capacity_blocks=3)
    change = index.apply(0, stored(K[0], K[1], K[2], K[3], K[4]))
    assert change == IndexChange(gained=K[:5], lost=[K[0], K[1]])  # bound enforced after the batch
    assert list(index.keys_of[0]) == [K[2], K[3], K[4]]
    assert set(index.holders) == {K[2], K[3], K[4]}
    index.check()
    assert index.apply(0, stored(K[2])) == IndexChange()  # held: only refreshed, now the newest
    assert list(index.keys_of[0]) == [K[3], K[4], K[2]]
    assert index.apply(0, stored(K[5])) == IndexChange(gained=[K[5]], lost=[K[3]])
    assert list(index.keys_of[0]) == [K[4], K[2], K[5]]
    index.check()


def test_bound_is_enforced_after_the_batch_so_a_late_removal_costs_nothing() -> None:
    """A worker at its bound stores a block before reporting the eviction that made room for it."""
    index = PreciseIndex(capacity_blocks=2)
    index.apply(0, stored(K[0], K[1]))
    change = index.apply(0, [BlockStored(K[2], b"", 0, "s"), BlockRemoved(K[0], 0, "s")])
    assert change == IndexChange(gained=[K[2]], lost=[K[0]])
    assert list(index.keys_of[0]) == [K[1], K[2]]
    # the removal of a key stored in the same batch: in both lists, in the order it happened
    change = index.apply(0, [BlockStored(K[3], b"", 0, "s"), BlockRemoved(K[3], 0, "s")])
    assert change == IndexChange(gained=[K[3]], lost=[K[3]])
    assert list(index.keys_of[0]) == [K[1], K[2]]
    index.check()


def test_a_forged_flood_never_grows_a_worker_past_its_own_bound() -> None:
    index = PreciseIndex(capacity_blocks=4)
    index.add_worker("small", capacity_blocks=2)
    index.add_worker("default")
    flood = [bytes([9, i % 256, i // 256]) * 5 + b"x" for i in range(1000)]
    for worker in ("small", "default"):
        change = index.apply(worker, stored(*flood))
        assert len(change.gained) == 1000 and change.lost == flood[: 1000 - index.num_keys(worker)]
    assert list(index.keys_of["small"]) == flood[-2:] and list(index.keys_of["default"]) == flood[-4:]
    assert index.overlaps(flood[-2:], 0.0) == {"small": 2, "default": 2}
    index.check()
    index.add_worker("default", capacity_blocks=3)  # a smaller bound: its oldest key goes at once
    assert list(index.keys_of["default"]) == flood[-3:]
    index.check()


def test_clear_and_forget_keep_the_slot_and_return_the_oldest_first() -> None:
    index = PreciseIndex()
    index.apply(0, stored(K[0], K[1], K[2], K[3]))
    index.apply(1, stored(K[0]))
    slot = index.slot(0)
    assert index.forget(0, 2) == [K[0], K[1]]
    assert index.overlaps(K[:1], 0.0) == {1: 1}
    assert index.forget(0, 0) == [] and index.forget("unknown", 5) == []
    assert index.clear(0) == [K[2], K[3]] and index.num_keys(0) == 0
    assert index.slot(0) == slot and set(index.holders) == {K[0]}
    index.check()


def test_a_removed_workers_slot_and_bound_are_not_inherited() -> None:
    index = PreciseIndex(capacity_blocks=8)
    index.add_worker("a", capacity_blocks=1)
    index.apply("a", stored(K[0]))
    slot = index.slot("a")
    index.remove_worker("a")
    assert index.keys_of.keys() == set() and index.holders == {}
    index.apply("b", stored(K[0], K[1], K[2]))  # takes a's slot, with the index's bound (8), not a's (1)
    assert index.slot("b") == slot and index.overlaps(K[:3], 0.0) == {"b": 3}
    index.check()


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "64"])
def test_a_bad_capacity_is_refused_naming_the_value_before_anything_changes(bad: object) -> None:
    with pytest.raises(ConfigError, match=f"capacity_blocks={bad!r}"):
        PreciseIndex(capacity_blocks=bad)  # type: ignore[arg-type]
    index = PreciseIndex()
    with pytest.raises(ConfigError, match=f"capacity_blocks={bad!r}"):
        index.add_worker("w", capacity_blocks=bad)  # type: ignore[arg-type]
    assert index.num_slots == 0 and index.keys_of == {}
    router = Router("lpm", "precise", 4)
    with pytest.raises(ConfigError, match=f"capacity_blocks={bad!r}"):
        router.add_worker("w", capacity_blocks=bad)  # type: ignore[arg-type]
    assert router.workers == []


def test_the_router_bounds_its_index_per_worker() -> None:
    router = Router("lpm", "precise", 4, capacity_blocks=3, clock=lambda: 0.0)
    router.add_worker("a")
    router.add_worker("b", capacity_blocks=1)
    router.on_events("a", stored(*K[:5]))
    router.on_events("b", stored(*K[:5]))
    assert router.index.overlaps(K[2:5], 0.0) == {"a": 3}
    assert router.index.overlaps(K[4:5], 0.0) == {"a": 1, "b": 1}
    assert router.route(RouteRequest("r", K[2:5], 12)) == "a"


def test_key_runs_change_the_router_as_their_events_do() -> None:
    by_events = Router("lpm", "precise", 4, capacity_blocks=3, clock=lambda: 0.0)
    by_runs = Router("lpm", "precise", 4, capacity_blocks=3, clock=lambda: 0.0)
    batches = [
        ("a", [*stored(K[0], K[1]), BlockRemoved(K[0], 0, "s"), *stored(K[2], K[3])]),
        ("b", stored(*K[:5])),  # past the bound: K[0] and K[1] are dropped
        ("a", [BlockRemoved(K[5], 5, "s"), *stored(K[0])]),  # a key it does not hold is ignored
        ("gone", stored(K[0])),  # not a worker: ignored
    ]
    for router in (by_events, by_runs):
        router.add_worker("a")
        router.add_worker("b")
    for worker, events in batches:
        by_events.on_events(worker, events)
        runs = [(isinstance(e, BlockStored), [e.key]) for e in events]
        by_runs.on_key_runs(worker, runs)
    for keys in (K[:4], K[1:4], K[2:5], K[0:1]):
        assert by_runs.index.overlaps(keys, 0.0) == by_events.index.overlaps(keys, 0.0)
    assert by_runs.index.overlaps(K[2:5], 0.0) == {"a": 2, "b": 3}
    assert [list(by_runs.index.keys_of[w]) for w in "ab"] == [[K[2], K[3], K[0]], K[2:5]]
    assert [list(by_runs.index.keys_of[w]) for w in "ab"] == [list(by_events.index.keys_of[w]) for w in "ab"]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.lists(st.tuples(st.integers(0, 9), st.booleans()), max_size=6))),
    st.integers(1, 5),
)
def test_bounded_index_matches_a_reference_lru_per_worker(
    batches: list[tuple[int, list[tuple[int, bool]]]], capacity: int
) -> None:
    """Each batch applied in order, then the oldest past the bound dropped: as a plain list says,
    keys and the gained and lost lists alike."""
    index = PreciseIndex(capacity_blocks=capacity)
    model: dict[int, list[bytes]] = {}
    for worker, ops in batches:
        held = model.setdefault(worker, [])
        want = IndexChange()
        events: list[BlockStored | BlockRemoved] = []
        for key, store in ops:
            k = bytes([key]) * 16
            if store:
                events.append(BlockStored(k, b"", 0, "s"))
                if k in held:
                    held.remove(k)  # refreshed: moves to the newest end
                else:
                    want.gained.append(k)
                held.append(k)
            else:
                events.append(BlockRemoved(k, 0, "s"))
                if k in held:
                    held.remove(k)
                    want.lost.append(k)
        over = max(0, len(held) - capacity)
        want.lost += held[:over]
        del held[:over]
        assert index.apply(worker, events) == want
        assert list(index.keys_of[worker]) == held
        index.check()
    for worker, held in model.items():
        assert index.num_keys(worker) == len(held)


def test_long_prompts_walk_in_chunks_and_decode_every_depth() -> None:
    """Prompts past one walk chunk (64 keys), depths on both sides of its edges, both decoders."""
    keys = [bytes([2, i % 256, i // 256]) * 5 + b"y" for i in range(200)]
    depths = [0, 1, 63, 64, 65, 127, 128, 129, 199, 200]
    for num_workers in (len(depths), 100):  # a few workers (Python decoding), and many (numpy)
        index = PreciseIndex()
        held = {w: set(keys[: depths[w % len(depths)]]) for w in range(num_workers)}
        for w, mine in held.items():
            index.apply(w, stored(*keys[: len(mine)]))
        for prompt in (keys, keys[:64], keys[:65], keys[:130]):
            want = brute_overlaps(held, prompt)
            assert index.overlaps(prompt, 0.0) == want
            assert index.overlap_by_slot(prompt, 0.0).tolist() == by_slot(index, want)
            assert all(index.overlap(w, prompt) == want.get(w, 0) for w in held)
