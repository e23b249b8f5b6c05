"""The block pool: a fixed set of blocks, their ref counts, a key index and LRU order.

Mechanism only. The pool allocates, frees, caches and evicts; it does not decide which prompt
maps to which key, who may see a block, or which tenant's block to evict (the manager does).

Invariants (checked by ``check_invariants`` in tests):
- every block id ``0..num_blocks-1`` is in exactly one of: referenced (ref_count > 0),
  ``free`` (ref 0, no key), ``lru`` (ref 0, keyed and reusable until evicted);
- ``index[key] == block_id`` implies ``blocks[block_id].key == key``;
- with ``track_owners``, a keyed block with ref 0 is also in its owner's ``lru_by_owner`` queue,
  stamped with ``lru_tick`` (global LRU order), and owners with no cached block have no queue.

LRU order is an ``OrderedDict`` (a C-level doubly linked list: O(1) touch, remove and pop of the
oldest). The per-owner queues exist only when quotas are configured: they let the manager pick
the oldest evictable block among owners above their floor without scanning the global queue.

Every operation works on a whole request's blocks in one loop (``touch``, ``take``,
``cache_run``, ``release``); events are buffered as tuples in a bounded deque and become
``BlockStored``/``BlockRemoved`` records when drained.
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
    lru_tick: int = 0  # when it entered the LRU queue (only kept with ``track_owners``)


EvictHook = Callable[[int, bytes], None]


class BlockPool:
    """``num_blocks`` blocks with ids ``0..num_blocks-1``.

    ``max_events``: events kept until drained (oldest dropped first and counted in
    ``num_events_dropped``); 0 turns events off. ``track_owners``: keep per-owner LRU queues
    (needed by quota enforcement).
    """

    def __init__(self, num_blocks: int, *, max_events: int = 65_536, track_owners: bool = False) -> None:
        self.blocks: list[Block] = [Block(i) for i in range(num_blocks)]
        self.free: deque[int] = deque(range(num_blocks))
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.track_owners = track_owners
        self.lru_by_owner: dict[str, OrderedDict[int, None]] = {}
        self.index: dict[bytes, int] = {}
        self.owned: dict[str, int] = {}  # blocks charged per owner, referenced or cached
        self.num_evictions = 0
        self.events: deque[tuple[object, ...]] = deque(maxlen=max_events)
        self._num_events = 0  # ever buffered; drops = buffered - drained - still buffered
        self._num_drained = 0
        self._tick = 0
        # Called with (block_id, key) for every block an operation is about to evict, before the
        # operation changes anything, while the bytes are intact (write-back to a spill tier).
        # If it raises, the operation raises and leaves the pool as it was.
        self.evict_hook: EvictHook | None = None

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

    @property
    def num_events_dropped(self) -> int:
        return self._num_events - self._num_drained - len(self.events)

    def cached(self, key: bytes) -> Block | None:
        block_id = self.index.get(key)
        return None if block_id is None else self.blocks[block_id]

    def lru_of(self, owner: str) -> Iterator[int]:
        assert self.track_owners, "per-owner LRU queues are kept only with track_owners"
        queue = self.lru_by_owner.get(owner)
        return iter(()) if queue is None else iter(queue)

    # ---- mutation ------------------------------------------------------------------------

    def notify_evictions(self, victims: Iterable[int]) -> None:
        """Run the evict hook for blocks about to be evicted, before anything changes."""
        hook = self.evict_hook
        if hook is None:
            return
        blocks = self.blocks
        for block_id in victims:
            key = blocks[block_id].key
            assert key is not None
            hook(block_id, key)

    def touch(self, hits: list[Block]) -> None:
        """Take a reference on each block; a cached block with no references leaves the LRU."""
        lru = self.lru
        by_owner = self.lru_by_owner if self.track_owners else None
        for block in hits:
            if block.ref_count == 0:
                del lru[block.block_id]
                if by_owner is not None:
                    self._leave_owner_queue(by_owner, block)
            block.ref_count += 1

    def take(self, owner: str, plan: list[int | None]) -> list[Block]:
        """Hand out one block per ``plan`` entry, charged to ``owner``: a cached block id to
        evict, or None for the next never-cached free block. The caller checked the plan and ran
        ``notify_evictions`` for its victims."""
        blocks, popleft, lru, index, owned = self.blocks, self.free.popleft, self.lru, self.index, self.owned
        by_owner = self.lru_by_owner if self.track_owners else None
        events = self.events if self.events.maxlen else None
        out: list[Block] = []
        num_evicted = 0
        for victim in plan:
            if victim is None:
                block = blocks[popleft()]
            else:
                block = blocks[victim]
                key = block.key
                del lru[victim]  # KeyError here would mean a victim not in the LRU: a planning bug
                del index[key]
                owned[block.owner] -= 1
                if by_owner is not None:
                    self._leave_owner_queue(by_owner, block)
                if events is not None:
                    events.append((key, victim, block.scope))
                block.key = None
                block.writers = None
                num_evicted += 1
            block.ref_count = 1
            block.owner = owner
            out.append(block)
        owned[owner] = owned.get(owner, 0) + len(plan)
        self.num_evictions += num_evicted
        if events is not None:
            self._num_events += num_evicted
        return out

    @staticmethod
    def _leave_owner_queue(by_owner: dict[str, OrderedDict[int, None]], block: Block) -> None:
        queue = by_owner[block.owner]
        del queue[block.block_id]
        if not queue:
            del by_owner[block.owner]

    def cache_run(
        self,
        blocks: list[Block],
        keys: list[bytes],
        parents: list[bytes],
        contents: list[bytes],
        scope: str,
        writer: str | None,
    ) -> list[bytes]:
        """Make full, referenced blocks reusable under their keys. Returns the keys another block
        already held (those blocks stay private to their request)."""
        index = self.index
        events = self.events if self.events.maxlen else None
        duplicates: list[bytes] = []
        # Callers pass referenced, unkeyed blocks (fresh from ``take``); ``check_invariants``
        # verifies the result in tests, so the loop itself carries no per-block assertion.
        for block, key, parent, content in zip(blocks, keys, parents, contents, strict=True):
            if key in index:
                duplicates.append(key)
                continue
            index[key] = block.block_id
            block.key = key
            block.parent = parent
            block.content = content
            block.scope = scope
            if writer is not None:
                block.writers = {writer}
            if events is not None:
                events.append((key, parent, block.block_id, scope))
        if events is not None:
            self._num_events += len(blocks) - len(duplicates)
        return duplicates

    def uncache(self, block: Block) -> None:
        """Drop a referenced block's key (its contents were never written, e.g. a failed request);
        it stays with its request and returns to the free queue when released."""
        key = block.key
        assert key is not None and block.ref_count > 0 and self.index[key] == block.block_id
        del self.index[key]
        if self.events.maxlen:
            self.events.append((key, block.block_id, block.scope))
            self._num_events += 1
        block.key = None
        block.writers = None

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block. Callers pass a request's blocks tail first, so
        that its tail blocks sit nearest the front of the LRU queue and are evicted first."""
        blocks, lru, free, owned = self.blocks, self.lru, self.free, self.owned
        by_owner = self.lru_by_owner if self.track_owners else None
        for block_id in block_ids:
            block = blocks[block_id]
            block.ref_count -= 1  # a request's blocks are released once: ``free`` pops the request
            if block.ref_count:
                continue
            if block.key is None:
                owned[block.owner] -= 1
                block.owner = ""
                free.append(block_id)
            else:
                lru[block_id] = None
                if by_owner is not None:
                    self._tick += 1
                    block.lru_tick = self._tick
                    queue = by_owner.get(block.owner)
                    if queue is None:
                        queue = by_owner[block.owner] = OrderedDict()
                    queue[block_id] = None

    def drain_events(self) -> list[CacheEvent]:
        """Buffered events, oldest first, as records; the buffer is emptied."""
        out: list[CacheEvent] = [
            BlockStored(*e) if len(e) == 4 else BlockRemoved(*e)  # type: ignore[arg-type]
            for e in self.events
        ]
        self._num_drained += len(out)
        self.events.clear()
        return out

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
                if self.track_owners:
                    assert block.block_id in self.lru_by_owner[block.owner]
            if block.key is not None:
                assert self.index[block.key] == block.block_id, "cached block not indexed"
            if not in_free:
                owned[block.owner] = owned.get(block.owner, 0) + 1
        assert len(self.index) == sum(b.key is not None for b in self.blocks)
        if self.track_owners:
            assert sum(len(q) for q in self.lru_by_owner.values()) == len(self.lru)
            assert all(self.lru_by_owner.values()), "an empty per-owner queue was kept"
            for queue in self.lru_by_owner.values():
                ticks = [self.blocks[i].lru_tick for i in queue]
                assert ticks == sorted(ticks), "a per-owner queue is out of LRU order"
        for owner, count in self.owned.items():
            assert owned.get(owner, 0) == count, f"owner {owner!r} charged {count}"
