"""The one least-recently-used map: keys in use order, oldest first, optionally bounded.

An ``OrderedDict`` underneath (a C-level doubly linked list: O(1) insert, touch, remove and pop of
the oldest). ``put`` inserts or refreshes one key and evicts at once; ``extend`` inserts a batch
first and evicts after it (what an index does with the blocks of one event or one request, so
that within a batch nothing pushes out a key of the same batch before the batch is whole).
Evictions are returned, oldest first, for the caller to act on (count them, drop the key from
another structure); the map itself has no hooks.

Not here: the block pool's free queue (``block_pool``), which orders blocks by tail-first
eviction rules of its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from kvcache.errors import ConfigError

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """Keys in use order (oldest first) with a value each; at most ``capacity`` of them when set."""

    __slots__ = ("_items", "capacity")

    def __init__(self, capacity: int | None = None) -> None:
        bad = isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1
        if capacity is not None and bad:
            raise ConfigError(f"LRU capacity={capacity!r} must be an integer >= 1 or None (unbounded)")
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[K]:
        """Keys, oldest first."""
        return iter(self._items)

    def items(self) -> Iterator[tuple[K, V]]:
        """Entries, oldest first."""
        return iter(self._items.items())

    def values(self) -> Iterator[V]:
        """Values, oldest first."""
        return iter(self._items.values())

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value of ``key`` without touching it."""
        return self._items.get(key, default)

    def touch(self, key: K) -> bool:
        """Make ``key`` the most recent; False (and nothing changes) when it is absent."""
        if key not in self._items:
            return False
        self._items.move_to_end(key)
        return True

    def put(self, key: K, value: V) -> list[tuple[K, V]]:
        """Insert or refresh ``key`` as the most recent; returns what the bound pushed out."""
        items = self._items
        items[key] = value
        items.move_to_end(key)
        return self._evict()

    def extend(self, entries: Iterable[tuple[K, V]]) -> list[tuple[K, V]]:
        """``put`` each entry in order, then evict once for the whole batch."""
        items = self._items
        move_to_end = items.move_to_end
        for key, value in entries:
            items[key] = value
            move_to_end(key)
        return self._evict()

    def pop(self, key: K) -> V | None:
        """Remove ``key``; its value, or None when it was absent."""
        return self._items.pop(key, None)

    def pop_oldest(self) -> tuple[K, V]:
        """Remove and return the least recently used entry (``KeyError`` when empty)."""
        return self._items.popitem(last=False)

    def _evict(self) -> list[tuple[K, V]]:
        cap, items = self.capacity, self._items
        if cap is None or len(items) <= cap:
            return []
        return [items.popitem(last=False) for _ in range(len(items) - cap)]
