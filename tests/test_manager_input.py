"""Library input hardening: bad prompts are typed errors that change nothing, prompts are
snapshots, a raising evict hook leaves the manager as it was, and the quota and decode paths cost
what they touch, not the whole pool."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from conftest import toks
from test_manager import snapshot

from kvcache import BlockManager, InvalidTokensError, TenantQuota
from kvcache.cache import hashing

MakeManager = Callable[..., BlockManager]


@pytest.mark.parametrize(
    "tokens",
    [
        [True, False, True, True],
        [1, 2, True, 3],
        (1, 2, False),
        np.array([True, False, True, True]),
    ],
)
def test_bools_are_not_token_ids(make_manager: MakeManager, tokens: Any) -> None:
    m = make_manager()
    m.allocate("warm", toks(0, 8), "a")
    before = snapshot(m)
    with pytest.raises(InvalidTokensError, match=r"must be integers|dtype bool"):
        m.allocate("x", tokens, "a")
    with pytest.raises(InvalidTokensError):
        m.append("warm", tokens)
    assert snapshot(m) == before
    m.check_invariants()


@pytest.mark.parametrize("prompt", [b"\x01\x02\x03", bytes(16), bytearray(b"\x01\x00\x00\x00"), "abcd"])
def test_text_and_bytes_prompts_are_rejected(make_manager: MakeManager, prompt: Any) -> None:
    m = make_manager()
    before = snapshot(m)
    with pytest.raises(InvalidTokensError, match="not text or its bytes"):
        m.hash(prompt)
    with pytest.raises(InvalidTokensError):
        m.allocate("x", prompt, "a")
    with pytest.raises(InvalidTokensError):
        m.publish(prompt)
    assert snapshot(m) == before


@pytest.mark.parametrize(
    "block_ids",
    [[1.5, 2.7], ["1", "2"], [True, 2], [1, -2], np.array([1.0, 2.0]), np.array([True, False]), b"\x01\x02"],
)
def test_hash_block_ids_takes_integers_only(make_manager: MakeManager, block_ids: Any) -> None:
    m = make_manager()
    with pytest.raises(InvalidTokensError):
        m.hash_block_ids(block_ids, 8, "a")


def test_hash_block_ids_accepts_ints_and_int_arrays(make_manager: MakeManager) -> None:
    m = make_manager()
    keys = m.hash_block_ids([1, 2**64 - 1], 8, "a").keys
    assert len(keys) == 2
    assert m.hash_block_ids(np.array([1, 2**64 - 1], dtype=np.uint64), 8, "a").keys == keys


def test_prompt_is_a_snapshot_of_the_callers_list(make_manager: MakeManager) -> None:
    m = make_manager()
    tokens = toks(0, 8)
    prompt = m.hash(tokens, "a")
    tokens.extend(toks(100, 8))  # the caller reuses its list
    m.publish(toks(500, 4))  # bumps the epoch: the stale prompt is re-hashed from its own copy
    alloc = m.allocate("r", prompt)
    assert (alloc.num_tokens, len(alloc.block_ids)) == (8, 2)
    assert m.hash(toks(0, 8), "a").keys == [m.pool.blocks[i].key for i in alloc.block_ids]
    assert prompt.tokens == toks(0, 8)
    m.check_invariants()


def test_a_raising_evict_hook_leaves_the_manager_as_it_was(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=4)
    m.allocate("a", toks(0, 16), "t")
    m.free("a")  # 4 cached blocks, every allocation now evicts

    def hook(block_id: int, key: bytes) -> None:
        raise RuntimeError("spill tier is down")

    m.set_evict_hook(hook)
    before = snapshot(m)
    with pytest.raises(RuntimeError, match="spill tier is down"):
        m.allocate("b", toks(100, 8), "t")
    assert snapshot(m) == before
    m.check_invariants()
    with pytest.raises(RuntimeError):
        m.try_allocate("b", toks(100, 8), "t")  # the blocks exist: the hook runs and raises
    assert snapshot(m) == before

    m.set_evict_hook(None)
    m.allocate("c", toks(200, 3), "t")  # one block, evicts one
    m.set_evict_hook(hook)
    before = snapshot(m)
    with pytest.raises(RuntimeError):
        m.append("c", toks(300, 2))  # needs a second block: another eviction
    assert snapshot(m) == before
    m.check_invariants()


def test_append_hashes_once_per_filled_block(
    make_manager: MakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = make_manager(num_blocks=16)
    m.allocate("r", toks(0, 5), "a")
    calls: list[int] = []
    for name in ("chain", "chain_blocks", "link"):
        real = getattr(hashing, name, None)
        if real is None:
            continue

        def counted(*args: Any, _real: Any = real) -> Any:
            calls.append(1)
            return _real(*args)

        monkeypatch.setattr(hashing, name, counted)
    for t in toks(5, 11):  # tokens 5..15: blocks 1, 2 and 3 fill (at tokens 7, 11, 15)
        m.append("r", [t])
    assert len(calls) == 3
    monkeypatch.undo()
    assert [m.pool.blocks[i].key for i in m.block_ids("r")] == m.hash(toks(0, 16), "a").keys
    m.check_invariants()


class _CountingLRU(OrderedDict[int, None]):
    """An LRU queue that counts the entries anyone iterates over."""

    visited = 0

    def __iter__(self) -> Iterator[int]:
        for block_id in super().__iter__():
            _CountingLRU.visited += 1
            yield block_id


def test_quota_plan_visits_only_what_it_evicts(make_manager: MakeManager) -> None:
    m = make_manager(num_blocks=600, vocab_size=None, quotas={"alice": TenantQuota(floor_blocks=500)})
    m.allocate("a", toks(0, 500 * 4), "alice")  # alice's floor protects the oldest 500 blocks
    m.free("a")
    m.allocate("b", toks(10_000, 100 * 4), "bob")
    m.free("b")
    m.pool.lru = _CountingLRU(m.pool.lru)
    _CountingLRU.visited = 0
    alloc = m.allocate("c", toks(20_000, 8), "carol")  # evicts bob's two oldest blocks
    assert _CountingLRU.visited <= 4
    assert alloc.block_ids == [599, 598]  # bob's tail blocks, freed first
    assert m.stats().owned_blocks == {"alice": 500, "bob": 98, "carol": 2}
    m.check_invariants()
