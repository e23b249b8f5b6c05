"""Block manager scenarios with exact block ids, eviction order, stats and events."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import toks

from kvcache import (
    BlockManager,
    BlockRemoved,
    BlockStored,
    CacheConfig,
    CapacityError,
    ConfigError,
    InvalidTokensError,
    RequestError,
)

MakeManager = Callable[..., BlockManager]


def snapshot(m: BlockManager) -> tuple[object, ...]:
    pool = m.pool
    return (
        [(b.ref_count, b.key, b.owner) for b in pool.blocks],
        list(pool.free),
        list(pool.lru),
        dict(pool.index),
        dict(pool.owned),
        m.stats(),
        len(pool.events),
        m.num_running,
    )


def test_allocate_then_reuse_prefix(make_manager: MakeManager) -> None:
    m = make_manager()
    a = m.allocate("r1", toks(0, 12), "t")
    assert (a.block_ids, a.num_cached_tokens) == ([0, 1, 2], 0)
    m.free("r1")
    b = m.allocate("r2", toks(0, 14), "t")
    assert (b.block_ids, b.num_cached_tokens) == ([0, 1, 2, 3], 12)
    m.check_invariants()


def test_block_metadata_is_made_as_blocks_are_first_handed_out(make_manager: MakeManager) -> None:
    """A pool of 1,000 blocks costs what it uses: metadata for ids 0..k-1 after k were taken."""
    m = make_manager(num_blocks=1000)
    assert (m.pool.num_blocks, len(m.pool.blocks), m.pool.num_free_blocks) == (1000, 0, 1000)
    a = m.allocate("r1", toks(0, 10), "t")  # 3 blocks: 2 full, 1 partial
    assert a.block_ids == [0, 1, 2] and [b.block_id for b in m.pool.blocks] == [0, 1, 2]
    m.free("r1")  # the partial block 2 goes back to the free queue's tail, behind 3..999
    b = m.allocate("r2", toks(100, 16), "u")
    assert b.block_ids == [3, 4, 5, 6] and len(m.pool.blocks) == 7
    assert m.pool.num_used_blocks == 4 and m.pool.num_free_blocks == 996
    m.check_invariants()
    m.free("r2")
    m.check_invariants()


def test_whole_prompt_hit_recomputes_last_block(make_manager: MakeManager) -> None:
    m = make_manager()
    m.allocate("r1", toks(0, 12), "t")
    m.free("r1")
    assert m.lookup(toks(0, 12), "t") == 12  # a probe reports what is cached
    a = m.allocate("r2", toks(0, 12), "t")
    assert a.num_cached_tokens == 8  # the model still computes the last block for its logits
    assert a.block_ids[:2] == [0, 1] and a.block_ids[2] != 2
    m.check_invariants()


def test_freed_tail_blocks_are_evicted_first(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=8)
    m.allocate("r1", toks(0, 10), "t")  # blocks 0, 1 full; block 2 partial (never cached)
    assert [type(e) for e in m.drain_events()] == [BlockStored, BlockStored]
    m.free("r1")
    assert list(m.pool.lru) == [1, 0]  # tail first
    assert list(m.pool.free) == [3, 4, 5, 6, 7, 2]
    b = m.allocate("r2", toks(500, 24), "t")
    assert b.block_ids == [3, 4, 5, 6, 7, 2]  # never-cached blocks go before any eviction
    m.drain_events()
    c = m.allocate("r3", toks(700, 8), "t")
    assert c.block_ids == [1, 0]
    removed = [e for e in m.drain_events() if isinstance(e, BlockRemoved)]
    assert [e.block_id for e in removed] == [1, 0]
    assert m.stats().evictions == 2
    assert m.lookup(toks(0, 10), "t") == 0
    m.check_invariants()


def test_lru_touch_order(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=4)
    m.allocate("a", toks(0, 4), "t")  # block 0
    m.allocate("b", toks(100, 4), "t")  # block 1
    m.free("a")
    m.free("b")
    assert list(m.pool.lru) == [0, 1]
    m.allocate("a2", toks(0, 5), "t")  # reuses block 0: it leaves the LRU queue
    m.free("a2")
    assert list(m.pool.lru) == [1, 0]  # block 0 is now most recently used
    m.check_invariants()


def test_shared_block_counts_references(make_manager: MakeManager) -> None:
    m = make_manager()
    m.allocate("a", toks(0, 9), "t")
    b = m.allocate("b", toks(0, 9), "t")
    assert b.num_cached_tokens == 8 and b.block_ids[:2] == [0, 1]
    assert [m.pool.blocks[i].ref_count for i in (0, 1)] == [2, 2]
    m.free("a")
    assert [m.pool.blocks[i].ref_count for i in (0, 1)] == [1, 1] and not m.pool.lru
    m.free("b")
    assert list(m.pool.lru) == [1, 0]
    m.check_invariants()


def test_append_makes_filled_block_shareable(make_manager: MakeManager) -> None:
    m = make_manager()
    m.allocate("r", toks(0, 6), "t")  # block 0 full, block 1 holds 2 tokens
    m.drain_events()
    assert m.append("r", [6]) == []
    assert m.drain_events() == []
    assert m.append("r", [7, 8]) == [2]  # block 1 fills, block 2 starts
    stored = m.drain_events()
    assert [(type(e), e.block_id) for e in stored] == [(BlockStored, 1)]
    assert m.lookup(toks(0, 9), "t") == 8
    assert m.block_ids("r") == [0, 1, 2]
    m.free("r")
    assert m.allocate("r2", toks(0, 9), "t").num_cached_tokens == 8
    m.check_invariants()


def test_append_across_several_blocks(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=16)
    m.allocate("r", toks(0, 3), "t")
    m.append("r", toks(3, 14))  # now 17 tokens: 4 full blocks + 1 token
    assert m.lookup(toks(0, 17), "t") == 16
    assert m.hash(toks(0, 17), "t").keys == [m.pool.blocks[i].key for i in m.block_ids("r")[:4]]
    m.check_invariants()


def test_stats_count_tokens_not_lookups(make_manager: MakeManager) -> None:
    m = make_manager()
    m.allocate("a", toks(0, 10), "t")
    m.lookup(toks(0, 10), "t")
    m.allocate("b", toks(0, 10), "t")
    s = m.stats()
    assert (s.requests, s.query_tokens, s.hit_tokens) == (2, 20, 8)
    assert s.hit_rate == pytest.approx(0.4)
    assert s.tenants["t"].hit_tokens == 8
    assert s.used_blocks == 4  # 2 shared full blocks + 2 private partial ones


def test_lookup_has_no_side_effects(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=4)
    m.allocate("a", toks(0, 4), "t")
    m.allocate("b", toks(100, 4), "t")
    m.free("a")
    m.free("b")
    m.drain_events()
    before = snapshot(m)
    assert m.lookup(toks(0, 8), "t") == 4
    assert snapshot(m) == before


def test_capacity_error_leaves_everything_unchanged(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=4)
    m.allocate("a", toks(0, 8), "t")
    m.allocate("b", toks(100, 4), "t")
    m.free("b")
    before = snapshot(m)
    with pytest.raises(CapacityError, match="need 3 free blocks, only 2"):
        m.allocate("c", toks(300, 12), "t")
    assert snapshot(m) == before
    assert not m.can_allocate(toks(300, 12), "t")
    assert m.can_allocate(toks(300, 8), "t")
    with pytest.raises(CapacityError):
        m.append("a", toks(900, 12))
    assert snapshot(m) == before
    m.check_invariants()


def test_can_allocate_agrees_with_allocate_when_the_last_block_is_recomputed(
    make_manager: MakeManager,
) -> None:
    m = make_manager(num_blocks=2, cap_hit_to_prompt_minus_one=True)
    m.allocate("a", toks(0, 8), "t")  # both blocks held by a running request
    assert m.lookup(toks(0, 8), "t") == 8
    # A repeat hits both blocks but must recompute the last one, and no block is free for it.
    assert not m.can_allocate(toks(0, 8), "t")
    with pytest.raises(CapacityError):
        m.allocate("b", toks(0, 8), "t")
    m.free("a")
    assert m.can_allocate(toks(0, 8), "t")
    assert m.allocate("b", toks(0, 8), "t").num_cached_tokens == 4
    assert not m.can_allocate(toks(0, 12), "t")  # larger than the whole pool


def test_prompt_larger_than_pool(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=4)
    with pytest.raises(CapacityError, match="needs 5 blocks of 4; the whole pool has 4"):
        m.allocate("a", toks(0, 17), "t")


def test_request_id_errors(make_manager: MakeManager) -> None:
    m = make_manager()
    m.allocate("a", toks(0, 4), "t")
    with pytest.raises(RequestError, match="'a' is already in use"):
        m.allocate("a", toks(0, 4), "t")
    m.free("a")
    with pytest.raises(RequestError, match="already freed"):
        m.free("a")
    with pytest.raises(RequestError, match="'nope'"):
        m.free("nope")
    with pytest.raises(RequestError):
        m.append("a", [1])


def test_bad_tokens_change_nothing(make_manager: MakeManager) -> None:
    m = make_manager()
    m.allocate("a", toks(0, 6), "t")
    before = snapshot(m)
    for bad in ([], [1, -1], [5000], [1.5]):
        with pytest.raises(InvalidTokensError):
            m.allocate("b", bad, "t")
        with pytest.raises(InvalidTokensError):
            m.append("a", bad)
    assert snapshot(m) == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_blocks": 0}, "num_blocks=0"),
        ({"num_blocks": 4, "block_size": 0}, "block_size=0"),
        ({"num_blocks": 4, "block_size": -16}, "block_size=-16"),
        ({"num_blocks": 4, "vocab_size": 0}, "vocab_size=0"),
        ({"num_blocks": 4, "k_anonymity": 0}, "k_anonymity=0"),
        ({"num_blocks": 4, "deployment_key": b"x" * 65}, "65 bytes"),
    ],
)
def test_bad_config_is_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CacheConfig(**kwargs)  # type: ignore[arg-type]


def test_block_ids_prompt_mooncake_style() -> None:
    m = BlockManager(CacheConfig(num_blocks=16, block_size=512))
    p = m.hash_block_ids([7, 8, 9], 1200, "t")  # 2 full blocks + a partial one
    assert len(p.keys) == 2
    assert m.allocate("a", p).block_ids == [0, 1, 2]
    m.free("a")
    assert m.allocate("b", m.hash_block_ids([7, 8, 10, 11], 1600, "t")).num_cached_tokens == 1024
    assert m.lookup(m.hash_block_ids([7, 99], 1024, "t")) == 512
    with pytest.raises(InvalidTokensError, match="expected ceil"):
        m.hash_block_ids([1, 2], 1500, "t")
    with pytest.raises(InvalidTokensError, match="cannot grow by tokens"):
        m.append("b", [1])


def test_crafted_key_collision_is_a_miss(make_manager: MakeManager, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcache.cache import hashing

    m = make_manager()
    # Every xxh3 link returns the same 128-bit value: the worst collision an attacker could craft.
    monkeypatch.setattr(hashing, "_xxh3_128", lambda data, seed=0: b"\x42" * 16)
    monkeypatch.setattr(hashing, "_chain_native", None)
    m.allocate("victim", toks(0, 9), "alice")
    assert m.lookup(toks(50, 9), "alice") == 0  # same key, other tokens: miss
    assert m.lookup(toks(0, 9), "mallory") == 0  # same key, other scope: miss
    a = m.allocate("attacker", toks(50, 9), "alice")
    assert a.num_cached_tokens == 0 and not set(a.block_ids) & {0, 1}
    # Positive control: the same tokens in the same scope still hit the first block, whose
    # parent is the root; the second block's stored parent differs, so it stops there.
    assert m.lookup(toks(0, 9), "alice") == 4
    m.check_invariants()


def test_a_block_id_request_grows_by_unkeyed_blocks_and_keeps_its_written_prefix() -> None:
    m = BlockManager(CacheConfig(num_blocks=4, block_size=4))
    p = m.hash_block_ids([1, 2], 6, "t")  # 1 full block, keyed, and a partial one
    assert m.allocate("a", p).block_ids == [0, 1]
    assert m.append_unkeyed("a", 3) == [2]  # 9 tokens: a third block, never keyed
    assert m.append_unkeyed("a", 2) == []
    assert [e.block_id for e in m.drain_events() if isinstance(e, BlockStored)] == [0]
    m.abort("a", num_computed_tokens=8)
    longer = m.extend_unkeyed(p, 5)
    assert (longer.keys, longer.num_tokens) == (p.keys, 11)
    assert m.lookup(longer) == 4  # the written prefix block stays cached
    with pytest.raises(InvalidTokensError, match="extended by its tokens"):
        m.extend_unkeyed(m.hash([1, 2, 3, 4, 5], "t"), 1)
    m.allocate("b", [1, 2, 3, 4, 5], "t")
    with pytest.raises(InvalidTokensError, match="grow it by tokens"):
        m.append_unkeyed("b", 1)
    m.check_invariants()
