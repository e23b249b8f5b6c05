"""``BlockManager.abort``: a failed request un-indexes the blocks it cached, keeps the prefix it reused."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import toks

from kvcache import BlockManager, BlockRemoved, BlockStored, RequestError


def test_abort_unindexes_own_blocks_and_keeps_reused_prefix(
    make_manager: Callable[..., BlockManager],
) -> None:
    m = make_manager(num_blocks=8, block_size=4)
    m.allocate("r1", toks(0, 8))  # blocks 0, 1 cached
    m.free("r1")
    m.drain_events()
    alloc = m.allocate("r2", toks(0, 14))  # reuses 0, 1; caches 2; block 3 holds the tail
    assert (alloc.block_ids, alloc.num_cached_tokens) == ([0, 1, 2, 3], 8)
    m.append("r2", [900, 901])  # fills block 3: cached too
    stored = m.drain_events()
    assert [e.block_id for e in stored if isinstance(e, BlockStored)] == [2, 3]
    m.abort("r2")
    events = m.drain_events()
    assert [(type(e), e.block_id) for e in events] == [(BlockRemoved, 2), (BlockRemoved, 3)]
    assert m.lookup(toks(0, 14)) == 8  # the reused prefix survives
    stats = m.stats()
    assert (stats.cached_free_blocks, stats.free_blocks, stats.used_blocks) == (2, 6, 0)
    assert m.num_running == 0
    m.check_invariants()
    with pytest.raises(RequestError, match="'r2' is not running"):
        m.abort("r2")
