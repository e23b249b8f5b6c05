"""Eviction planning: which blocks an allocation takes, decided before anything changes.

A plan is one entry per new block: a cached block id to evict, or None for a never-cached free
block. Planning only reads the pool; it raises ``CapacityError`` (or ``QuotaError``) when the
blocks cannot all be found, so a failed allocation changes nothing. Taking the blocks is the
pool's job (``BlockPool.take``), choosing the tenant and the blocks to reuse is the manager's.

Both planners cost O(blocks evicted + pinned blocks), plus O(owners) with quotas: they never walk
past blocks they will not evict.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from itertools import islice

from kvcache.cache.block_pool import BlockPool
from kvcache.cache.config import CacheConfig
from kvcache.errors import CapacityError, QuotaError


def plan(pool: BlockPool, num_new: int, pinned: set[int]) -> list[int | None]:
    """Without quotas: never-cached free blocks first, then the least recently used cached ones.
    ``pinned``: cached blocks about to be reused, never evicted."""
    out = try_plan(pool, num_new, pinned)
    if out is None:
        available = len(pool.free) + len(pool.lru) - len(pinned)
        raise CapacityError(
            f"need {num_new} free blocks, only {available} of {pool.num_blocks} can be "
            "freed (the rest are in use by running requests); nothing was allocated"
        )
    return out


def try_plan(pool: BlockPool, num_new: int, pinned: set[int]) -> list[int | None] | None:
    """``plan``, or None when the blocks cannot all be found: for a caller that waits and tries
    again (a scheduler's head of queue, every step), without an error built each time."""
    num_free = len(pool.free)
    if num_new > num_free + len(pool.lru) - len(pinned):
        return None
    out: list[int | None] = [None] * min(num_free, num_new)
    num_evict = num_new - len(out)
    if num_evict:
        oldest: Iterator[int] = iter(pool.lru)
        if pinned:
            oldest = (b for b in pool.lru if b not in pinned)
        out += islice(oldest, num_evict)
    return out


def plan_with_quotas(
    pool: BlockPool, config: CacheConfig, tenant: str, num_new: int, pinned: set[int]
) -> list[int | None]:
    """With quotas: past its cap a tenant evicts its own oldest blocks first; then free blocks;
    then the oldest blocks of owners above their floor; as a last resort the tenant's own blocks
    below its floor. Needs ``pool.track_owners``."""
    out: list[int | None] = []
    chosen: set[int] = set()
    cap = config.quota_for(tenant).cap_blocks
    owned = pool.owned.get(tenant, 0)
    over_cap = owned + num_new - cap if cap is not None else 0
    if over_cap > 0:
        own = list(islice((b for b in pool.lru_of(tenant) if b not in pinned), over_cap))
        if len(own) < over_cap:
            raise QuotaError(
                f"tenant {tenant!r} owns {owned} blocks and needs {num_new} more, over its "
                f"cap_blocks={cap}, and only {len(own)} of its own cached blocks can be "
                "evicted; nothing was allocated"
            )
        out += own
        chosen.update(own)
    out.extend([None] * min(len(pool.free), num_new - len(out)))
    if len(out) < num_new:
        out += _oldest_above_floor(pool, config, tenant, num_new - len(out), len(chosen), pinned | chosen)
    if len(out) < num_new:
        # Last resort: the requester's own cached blocks, below its own floor.
        skip = pinned | {b for b in out if b is not None}
        out += islice((b for b in pool.lru_of(tenant) if b not in skip), num_new - len(out))
    if len(out) < num_new:
        raise CapacityError(
            f"need {num_new} free blocks for tenant {tenant!r}, only {len(out)} can be freed "
            "(the rest are in use or protected by other tenants' floors); nothing was allocated"
        )
    return out


def _oldest_above_floor(
    pool: BlockPool, config: CacheConfig, tenant: str, count: int, num_own_chosen: int, skip: set[int]
) -> list[int]:
    """Up to ``count`` cached blocks in global LRU order, skipping owners at or below their floor
    (the requester included, so a tenant within its floor is never evicted by its own load while
    others' blocks can go instead). A merge of the per-owner queues by LRU tick: the same order as
    walking the global queue, without visiting protected owners' blocks."""
    blocks = pool.blocks
    evicted: dict[str, int] = {tenant: num_own_chosen}
    heap: list[tuple[int, int, str, Iterator[int]]] = []
    for owner, queue in pool.lru_by_owner.items():
        if pool.owned[owner] - evicted.get(owner, 0) <= config.quota_for(owner).floor_blocks:
            continue
        candidates: Iterator[int] = (b for b in queue if b not in skip)
        first = next(candidates, None)
        if first is not None:
            heap.append((blocks[first].lru_tick, first, owner, candidates))
    heapq.heapify(heap)
    out: list[int] = []
    while heap and len(out) < count:
        _tick, block_id, owner, remaining = heapq.heappop(heap)
        out.append(block_id)
        evicted[owner] = evicted.get(owner, 0) + 1
        if pool.owned[owner] - evicted[owner] <= config.quota_for(owner).floor_blocks:
            continue
        nxt = next(remaining, None)
        if nxt is not None:
            heapq.heappush(heap, (blocks[nxt].lru_tick, nxt, owner, remaining))
    return out
