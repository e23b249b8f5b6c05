"""BlockManager.set_evict_hook: called with (block_id, key) just before a cached slot is reused."""

from __future__ import annotations

from collections.abc import Callable

from conftest import toks

from kvcache import BlockManager, BlockRemoved


def test_hook_sees_each_evicted_block_before_reuse(make_manager: Callable[..., BlockManager]) -> None:
    m = make_manager(num_blocks=4, block_size=4)
    seen: list[tuple[int, bytes, bool]] = []
    m.set_evict_hook(lambda block_id, key: seen.append((block_id, key, m.pool.index.get(key) == block_id)))
    a = m.allocate("a", toks(0, 8))
    keys_a = m.hash(toks(0, 8)).keys
    m.free("a")
    m.allocate("b", toks(100, 8))  # takes the two never-used blocks: no eviction
    assert seen == []
    m.free("b")
    m.allocate("c", toks(200, 8))  # evicts a's blocks, tail first
    # still indexed when the hook runs: its bytes are intact
    assert seen == [(a.block_ids[1], keys_a[1], True), (a.block_ids[0], keys_a[0], True)]
    removed = [e for e in m.drain_events() if isinstance(e, BlockRemoved)]
    assert [(e.block_id, e.key) for e in removed] == [(i, k) for i, k, _ in seen]
    m.set_evict_hook(None)
    m.free("c")
    m.allocate("d", toks(300, 8))
    assert len(seen) == 2
    m.check_invariants()
