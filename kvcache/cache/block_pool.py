"""The block pool: a fixed set of blocks, their ref counts, a key index and LRU order.

Mechanism only. The pool allocates, frees, caches and evicts; it does not decide which prompt
maps to which key, who may see a block, or which tenant's block to evict (the manager does).

Invariants (checked by ``check_invariants`` in tests):
- every block id ``0..num_blocks-1`` is in exactly one of: referenced (ref_count > 0),
  ``free`` (ref 0, no key), ``lru`` (ref 0, keyed and reusable until evicted);
- ``index[key] == block_id`` implies ``blocks[block_id].key == key``;
- with ``track_owners``, a keyed block with ref 0 is also in its owner's ``lru_by_owner`` queue,
  stamped with ``lru_tick`` (global LRU order), and owners with no cached block have no queue.

A block's metadata (``Block``) is made the first time the block is handed out: ``free`` starts
as ``0..num_blocks-1`` in order and freed blocks join its tail, so never-used ids leave it in
increasing order, each equal to ``len(blocks)`` when it does; ``blocks`` holds exactly the ids
handed out so far. A pool most of which is never used (a simulated fleet of a thousand workers)
costs nothing for the rest.

LRU order is an ``OrderedDict`` (a C-level doubly linked list: O(1) touch, remove and pop of the
oldest). The per-owner queues exist only when quotas are configured: they let the manager pick
the oldest evictable block among owners above their floor without scanning the global queue.

Every operation works on a whole request's blocks in one loop (``touch``, ``take``,
``cache_run``, ``release``). Events are buffered one entry per operation (the lists the operation
already holds), at most ``max_events`` events in all, and become ``BlockStored``/``BlockRemoved``
records when drained.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kvcache.cache.events import BlockRemoved, BlockStored, CacheEvent


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
        self._num_blocks = num_blocks
        self.blocks: list[Block] = []  # ids handed out so far (see the module docstring)
        self.free: deque[int] = deque(range(num_blocks))
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.track_owners = track_owners
        self.lru_by_owner: dict[str, OrderedDict[int, None]] = {}
        self.index: dict[bytes, int] = {}
        self.owned: dict[str, int] = {}  # blocks charged per owner, referenced or cached
        self.num_evictions = 0
        # One entry per operation: ("stored", blocks, keys, parents, scope, duplicate keys or None),
        # ("removed", keys, block ids, scopes) or ("records", [CacheEvent, ...]).
        self.events: deque[tuple[Any, ...]] = deque()
        self.max_events = max_events
        self._num_buffered = 0  # events (not entries) in ``events``
        self.num_events_dropped = 0
        self._tick = 0
        # Moves with every operation that can let through an allocation the planner refused (a
        # manager remembers a refusal by it): blocks released, blocks cached (a longer prefix may
        # match), and with per-owner queues any change (quota floors move with ownership). Taking,
        # touching or un-caching blocks without quotas only leaves less to find: a prefix match
        # can shrink, but each hit it loses frees at most the one block it no longer saves.
        self.room_version = 0
        # Called with (block_id, key) for every block an operation is about to evict, before the
        # operation changes anything, while the bytes are intact (write-back to a spill tier).
        # If it raises, the operation raises and leaves the pool as it was.
        self.evict_hook: EvictHook | None = None

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: never-cached free ones plus evictable cached ones."""
        return len(self.free) + len(self.lru)

    @property
    def num_used_blocks(self) -> int:
        return self._num_blocks - len(self.free) - len(self.lru)

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
        if self.track_owners:
            self.room_version += 1
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
        if self.track_owners:
            self.room_version += 1
        blocks, popleft, lru, index, owned = self.blocks, self.free.popleft, self.lru, self.index, self.owned
        by_owner = self.lru_by_owner if self.track_owners else None
        with_events = self.max_events > 0
        removed_keys: list[bytes] = []
        removed_ids: list[int] = []
        removed_scopes: list[str] = []
        out: list[Block] = []
        for victim in plan:
            if victim is None:
                block_id = popleft()
                if block_id == len(blocks):  # never handed out before: its metadata starts now
                    blocks.append(Block(block_id))
                block = blocks[block_id]
            else:
                block = blocks[victim]
                key: bytes = block.key  # type: ignore[assignment]  # a victim is cached: keyed
                del lru[victim]  # KeyError here would mean a victim not in the LRU: a planning bug
                del index[key]
                owned[block.owner] -= 1
                if by_owner is not None:
                    self._leave_owner_queue(by_owner, block)
                if with_events:
                    removed_keys.append(key)
                    removed_ids.append(victim)
                    removed_scopes.append(block.scope)
                block.key = None
                block.writers = None
            block.ref_count = 1
            block.owner = owner
            out.append(block)
        owned[owner] = owned.get(owner, 0) + len(plan)
        num_evicted = len(plan) - plan.count(None)
        self.num_evictions += num_evicted
        if removed_keys:
            self._buffer(("removed", removed_keys, removed_ids, removed_scopes), len(removed_keys))
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
        self.room_version += 1
        index = self.index
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
        num_stored = len(blocks) - len(duplicates)
        if num_stored and self.max_events:
            # The caller's lists are fresh slices it never changes again; block ids are fixed.
            dups = set(duplicates) if duplicates else None
            self._buffer(("stored", blocks, keys, parents, scope, dups), num_stored)
        return duplicates

    def uncache(self, block: Block) -> None:
        """Drop a referenced block's key (its contents were never written, e.g. a failed request);
        it stays with its request and returns to the free queue when released."""
        if self.track_owners:
            self.room_version += 1
        key = block.key
        assert key is not None and block.ref_count > 0 and self.index[key] == block.block_id
        del self.index[key]
        if self.max_events:
            self._buffer(("records", [BlockRemoved(key, block.block_id, block.scope)]), 1)
        block.key = None
        block.writers = None

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block. Callers pass a request's blocks tail first, so
        that its tail blocks sit nearest the front of the LRU queue and are evicted first."""
        self.room_version += 1
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
        out: list[CacheEvent] = []
        for entry in self._take_entries():
            out += _records(entry)
        return out

    def drain_key_runs(self) -> list[tuple[bool, list[bytes]]]:
        """``drain_events`` as runs of keys, oldest first: ``(True, keys)`` stored, ``(False,
        keys)`` removed, for a consumer that reads only the keys (``PreciseIndex.apply_keys``),
        without a record per block; the buffer is emptied."""
        out: list[tuple[bool, list[bytes]]] = []
        if not self.events:  # most steps store and evict nothing
            return out
        for entry in self._take_entries():
            out += _key_runs(entry)
        return out

    def _take_entries(self) -> list[tuple[Any, ...]]:
        if not self.events:
            return []
        entries = list(self.events)
        self.events.clear()
        self._num_buffered = 0
        return entries

    def _buffer(self, entry: tuple[Any, ...], num_events: int) -> None:
        self.events.append(entry)
        self._num_buffered += num_events
        excess = self._num_buffered - self.max_events
        while excess > 0:  # drop the oldest events beyond the bound, and count them
            oldest = self.events.popleft()
            size = _size(oldest)
            if size > excess:
                self.events.appendleft(_skip(oldest, excess))
                size = excess
            self._num_buffered -= size
            self.num_events_dropped += size
            excess -= size

    # ---- checking ------------------------------------------------------------------------

    def check_invariants(self) -> None:
        free, lru = set(self.free), set(self.lru)
        assert len(free) == len(self.free), "a block is twice in the free queue"
        assert not free & lru, "a block is both free and cached"
        assert all(b.block_id == i for i, b in enumerate(self.blocks)), "blocks out of id order"
        assert set(range(len(self.blocks), self._num_blocks)) <= free, "a never-used block is not free"
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


def _size(entry: tuple[Any, ...]) -> int:
    if entry[0] == "stored":
        dups = entry[5]
        return len(entry[2]) - (len(dups) if dups else 0)
    return len(entry[1])


def _skip(entry: tuple[Any, ...], count: int) -> tuple[Any, ...]:
    """The entry without its ``count`` oldest events."""
    kind = entry[0]
    if kind == "stored" and entry[5] is None:
        _, blocks, keys, parents, scope, _dups = entry
        return ("stored", blocks[count:], keys[count:], parents[count:], scope, None)
    if kind == "removed":
        _, keys, ids, scopes = entry
        return ("removed", keys[count:], ids[count:], scopes[count:])
    return ("records", _records(entry)[count:])


def _key_runs(entry: tuple[Any, ...]) -> list[tuple[bool, list[bytes]]]:
    """The entry's events as runs of keys (``_records`` without the records)."""
    kind = entry[0]
    if kind == "stored":
        keys, dups = entry[2], entry[5]
        return [(True, keys if dups is None else [k for k in keys if k not in dups])]
    if kind == "removed":
        return [(False, entry[1])]
    return [(type(e) is BlockStored, [e.key]) for e in entry[1]]


def _records(entry: tuple[Any, ...]) -> list[CacheEvent]:
    kind = entry[0]
    if kind == "stored":
        _, blocks, keys, parents, scope, dups = entry
        return [
            BlockStored(key, parent, block.block_id, scope)
            for block, key, parent in zip(blocks, keys, parents, strict=True)
            if dups is None or key not in dups
        ]
    if kind == "removed":
        _, keys, ids, scopes = entry
        return [BlockRemoved(k, i, s) for k, i, s in zip(keys, ids, scopes, strict=True)]
    return list(entry[1])
