"""The block pool: a fixed set of blocks, their ref counts, a key index and LRU order.

Mechanism only. The pool allocates, frees, caches and evicts; it does not decide which prompt
maps to which key, who may see a block, or which tenant's block to evict (the manager does).

Invariants (checked by ``check_invariants`` in tests):
- every block id ``0..num_blocks-1`` is in exactly one of: referenced (ref_count > 0),
  ``free`` (ref 0, no key), ``lru`` (ref 0, keyed and reusable until evicted);
- ``index[key] == block_id`` implies ``blocks[block_id].key == key``;
- a keyed block with ref 0 is in ``lru`` and in its owner's ``lru_by_owner`` queue, nowhere else.

LRU order is an ``OrderedDict`` (a C-level doubly linked list: O(1) touch, remove and pop of the
oldest). A second queue per owner lets quota enforcement find a tenant's own oldest block in O(1).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from kvcache.events import BlockRemoved, BlockStored, CacheEvent


@dataclass(slots=True)
class Block:
    """One block's metadata. ``key`` is None until the block is full and cached."""

    block_id: int
    ref_count: int = 0
    key: bytes | None = None
    parent: bytes = b""  # the chain link before this block; confirms a hit with ``content``
    content: bytes = b""  # the block's encoded tokens (or block id); confirms a hit
    scope: str = ""  # chain scope the key was computed in ("public", "tenant:a", "group:g")
    owner: str = ""  # tenant charged for the block (quotas, stats)
    writers: set[str] | None = None  # tenants that wrote this key (k-anonymity); None = unused


class BlockPool:
    """``num_blocks`` blocks with ids ``0..num_blocks-1``."""

    def __init__(self, num_blocks: int) -> None:
        self.blocks: list[Block] = [Block(i) for i in range(num_blocks)]
        self.free: deque[int] = deque(range(num_blocks))
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.lru_by_owner: dict[str, OrderedDict[int, None]] = {}
        self.index: dict[bytes, int] = {}
        self.owned: dict[str, int] = {}  # blocks charged per owner, referenced or cached
        self.num_evictions = 0
        self.events: list[CacheEvent] = []
        # Called with (block_id, key) just before a cached block's slot is reused, while its
        # bytes are still intact (write-back to a spill tier). It must not raise.
        self.evict_hook: Callable[[int, bytes], None] | None = None

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: never-cached free ones plus evictable cached ones."""
        return len(self.free) + len(self.lru)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - len(self.free) - len(self.lru)

    def cached(self, key: bytes) -> Block | None:
        block_id = self.index.get(key)
        return None if block_id is None else self.blocks[block_id]

    def lru_of(self, owner: str) -> Iterator[int]:
        queue = self.lru_by_owner.get(owner)
        return iter(()) if queue is None else iter(queue)

    # ---- mutation ------------------------------------------------------------------------

    def touch(self, block: Block) -> None:
        """Take a reference; a cached block with no references leaves the LRU queue."""
        if block.ref_count == 0 and block.key is not None:
            del self.lru[block.block_id]
            del self.lru_by_owner[block.owner][block.block_id]
        block.ref_count += 1

    def take(self, owner: str, victim: int | None = None) -> Block:
        """Hand out one block charged to ``owner``: ``victim`` if given (a cached block to
        evict), else a never-cached free block, else the least recently used cached block."""
        if victim is None and self.free:
            block = self.blocks[self.free.popleft()]
        else:
            if victim is None:
                victim = next(iter(self.lru))
            block = self.blocks[victim]
            self._evict(block)
        assert block.ref_count == 0 and block.key is None
        block.ref_count = 1
        block.owner = owner
        self.owned[owner] = self.owned.get(owner, 0) + 1
        return block

    def _evict(self, block: Block) -> None:
        key = block.key
        assert key is not None and block.ref_count == 0
        if self.evict_hook is not None:
            self.evict_hook(block.block_id, key)
        del self.lru[block.block_id]
        del self.lru_by_owner[block.owner][block.block_id]
        del self.index[key]
        self.owned[block.owner] -= 1
        self.events.append(BlockRemoved(key, block.block_id, block.scope))
        block.key = None
        block.writers = None
        self.num_evictions += 1

    def cache(
        self, block: Block, key: bytes, parent: bytes, content: bytes, scope: str, writer: str | None
    ) -> bool:
        """Make a full, referenced block reusable under ``key``. Returns False (and leaves the
        block private to its request) when another block already holds that key."""
        assert block.ref_count > 0 and block.key is None
        if key in self.index:
            return False
        block.key = key
        block.parent = parent
        block.content = content
        block.scope = scope
        block.writers = None if writer is None else {writer}
        self.index[key] = block.block_id
        self.events.append(BlockStored(key, parent, block.block_id, scope))
        return True

    def uncache(self, block: Block) -> None:
        """Drop a referenced block's key (its contents were never written, e.g. a failed request);
        it stays with its request and returns to the free queue when released."""
        key = block.key
        assert key is not None and block.ref_count > 0 and self.index[key] == block.block_id
        del self.index[key]
        self.events.append(BlockRemoved(key, block.block_id, block.scope))
        block.key = None
        block.writers = None

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block. Callers pass a request's blocks tail first, so
        that its tail blocks sit nearest the front of the LRU queue and are evicted first."""
        blocks = self.blocks
        for block_id in block_ids:
            block = blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} released more often than taken"
            block.ref_count -= 1
            if block.ref_count:
                continue
            if block.key is None:
                self.owned[block.owner] -= 1
                block.owner = ""
                self.free.append(block_id)
            else:
                self.lru[block_id] = None
                queue = self.lru_by_owner.get(block.owner)
                if queue is None:
                    queue = self.lru_by_owner[block.owner] = OrderedDict()
                queue[block_id] = None

    def drain_events(self) -> list[CacheEvent]:
        events, self.events = self.events, []
        return events

    # ---- checking ------------------------------------------------------------------------

    def check_invariants(self) -> None:
        free, lru = set(self.free), set(self.lru)
        assert len(free) == len(self.free), "a block is twice in the free queue"
        assert not free & lru, "a block is both free and cached"
        owned: dict[str, int] = {}
        for block in self.blocks:
            assert block.ref_count >= 0, f"block {block.block_id} has ref_count {block.ref_count}"
            in_free, in_lru = block.block_id in free, block.block_id in lru
            if block.ref_count > 0:
                assert not in_free and not in_lru, f"referenced block {block.block_id} is free"
            elif block.key is None:
                assert in_free, f"block {block.block_id} is lost (ref 0, no key, not free)"
            else:
                assert in_lru, f"cached block {block.block_id} is not in the LRU queue"
                assert block.block_id in self.lru_by_owner[block.owner]
            if block.key is not None:
                assert self.index[block.key] == block.block_id, "cached block not indexed"
            if not in_free:
                owned[block.owner] = owned.get(block.owner, 0) + 1
        assert len(self.index) == sum(b.key is not None for b in self.blocks)
        assert sum(len(q) for q in self.lru_by_owner.values()) == len(self.lru)
        for owner, count in self.owned.items():
            assert owned.get(owner, 0) == count, f"owner {owner!r} charged {count}"
