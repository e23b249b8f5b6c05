"""Slab-backed tiers: a fixed number of slots indexed by key, in LRU order, over one tensor.

The device tier (G1) and the host tier (G2) keep blocks in one preallocated tensor each; this
table says which slot holds which key and which key goes first when the slab is full. It never
touches tensors.

Invariant: every slot ``0..capacity-1`` is either in ``free`` or the value of exactly one key in
``lru``; ``lru`` runs from least to most recently used.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

import torch

from kvcache.cache.lru import LRU
from kvcache.errors import TierError
from kvcache.tiers.base import LayoutFingerprint, Tier, TierKey

K = TypeVar("K", bound=Hashable)


class SlotTable(Generic[K]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free: list[int] = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first
        self.lru: LRU[K, int] = LRU()  # unbounded: the free list is the bound

    def __len__(self) -> int:
        return len(self.lru)

    def __contains__(self, key: object) -> bool:
        return key in self.lru

    def __iter__(self) -> Iterator[K]:
        return iter(self.lru)

    def get(self, key: K, touch: bool = True) -> int | None:
        slot = self.lru.get(key)
        if slot is not None and touch:
            self.lru.touch(key)
        return slot

    def oldest(self) -> tuple[K, int] | None:
        """The least recently used key and its slot, or None when empty."""
        return next(iter(self.lru.items()), None)

    def put(self, key: K) -> int:
        """The slot for ``key`` (its own if held, else a free one). The table must not be full
        unless ``key`` is held: callers evict ``oldest()`` first."""
        slot = self.lru.get(key)
        if slot is not None:
            self.lru.touch(key)
            return slot
        assert self.free, "slot table is full; evict before put"
        slot = self.free.pop()
        self.lru.put(key, slot)
        return slot

    def pop(self, key: K) -> int | None:
        slot = self.lru.pop(key)
        if slot is not None:
            self.free.append(slot)
        return slot

    @property
    def full(self) -> bool:
        return not self.free

    def check_invariants(self) -> None:
        slots = list(self.lru.values()) + self.free
        assert sorted(slots) == list(range(self.capacity)), "a slot is lost or held twice"


class SlabTier(Tier):
    """A tier whose blocks live in one preallocated tensor of ``capacity_blocks`` slots.

    Bound to one layout (the slab's shape and dtype): storing another layout raises
    ``TierError``; looking one up is a miss. Subclasses say how a slot is read and written.
    """

    def __init__(self, layout: LayoutFingerprint, capacity_blocks: int) -> None:
        super().__init__(capacity_blocks)
        self.layout = layout
        self.table: SlotTable[bytes] = SlotTable(capacity_blocks)

    @abstractmethod
    def _slot_view(self, slot: int) -> torch.Tensor:
        """Slot ``slot`` as a block ``[L, 2, block_size, kv_heads, head_dim]`` (a view)."""

    def _write(self, slot: int, block: torch.Tensor) -> None:
        self._slot_view(slot).copy_(block)

    def _read(self, slot: int, out: torch.Tensor | None) -> torch.Tensor:
        view = self._slot_view(slot)
        if out is None:
            return view.clone()
        self.layout.check_block(out)
        out.copy_(view)
        return out

    def _mine(self, key: TierKey) -> bool:
        layout = key.layout
        return layout is self.layout or layout == self.layout  # identity first: the common case

    def contains(self, key: TierKey) -> bool:
        return self._mine(key) and key.key in self.table

    def load(self, key: TierKey, out: torch.Tensor | None = None) -> torch.Tensor | None:
        slot = self.table.get(key.key) if self._mine(key) else None
        if slot is None:
            self._stats.misses += 1
            return None
        started = time.perf_counter()
        block = self._read(slot, out)
        s = self._stats
        s.stall_ms += (time.perf_counter() - started) * 1e3  # host time; async device copies excluded
        s.hits += 1
        s.blocks_out += 1
        s.bytes_out += self.layout.block_nbytes
        return block

    def store(self, key: TierKey, block: torch.Tensor) -> None:
        if not self._mine(key):
            raise TierError(f"{self.name} holds layout {self.layout}; cannot store a block of {key.layout}")
        self.layout.check_block(block)
        table = self.table
        if key.key not in table and table.full:
            oldest = table.oldest()
            assert oldest is not None
            old_key, old_slot = oldest
            if self.on_evict is not None:
                self.on_evict(TierKey(old_key, self.layout), self._slot_view(old_slot))
            table.pop(old_key)
            self._stats.evictions += 1
        self._write(table.put(key.key), block)
        s = self._stats
        s.blocks_in += 1
        s.bytes_in += self.layout.block_nbytes

    def remove(self, key: TierKey) -> bool:
        return self._mine(key) and self.table.pop(key.key) is not None

    def __len__(self) -> int:
        return len(self.table)
