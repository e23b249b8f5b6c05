"""What the router believes each worker caches: which workers hold each block key.

Two ways to learn it, never by reading a worker's internals:

- ``PreciseIndex`` applies the workers' ``BlockStored``/``BlockRemoved`` events (however late
  they arrive: the delay is the transport's, modelled by the replay).
- ``ApproxIndex`` records the router's own decisions: routing a request to a worker is taken to
  cache its blocks there for ``ttl_ms`` (SGLang's gateway keeps such a tree, Dynamo's router has
  the same mode without events).

Both answer one question: for a request's block keys, how many leading keys each worker holds
(the prefix overlap, in blocks). Chains make a key imply its whole prefix, so the walk stops at
the first key no candidate holds. Policies are elsewhere (``policies``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from kvcache.events import BlockStored, CacheEvent


def _walk(
    keys: Sequence[bytes], workers: Iterable[int], holding: Callable[[bytes, set[int]], set[int]]
) -> dict[int, int]:
    """Leading keys each worker holds; ``holding(key, candidates)`` says which candidates hold key."""
    overlap = dict.fromkeys(workers, 0)
    candidates = set(overlap)
    depth = 0
    for key in keys:
        held = holding(key, candidates)
        for w in candidates - held:
            overlap[w] = depth
        candidates = held
        if not candidates:
            break
        depth += 1
    for w in candidates:
        overlap[w] = depth
    return overlap


class PreciseIndex:
    """Block key -> workers holding it, kept from worker events."""

    def __init__(self) -> None:
        self.holders: dict[bytes, set[int]] = {}
        self.keys_of: dict[int, set[bytes]] = {}

    def apply(self, worker_id: int, events: Iterable[CacheEvent]) -> None:
        keys = self.keys_of.setdefault(worker_id, set())
        holders = self.holders
        for event in events:
            if isinstance(event, BlockStored):
                holders.setdefault(event.key, set()).add(worker_id)
                keys.add(event.key)
            else:
                held = holders.get(event.key)
                if held is not None:
                    held.discard(worker_id)
                    if not held:
                        del holders[event.key]
                keys.discard(event.key)

    def remove_worker(self, worker_id: int) -> None:
        for key in self.keys_of.pop(worker_id, set()):
            held = self.holders[key]
            held.discard(worker_id)
            if not held:
                del self.holders[key]

    def overlaps(self, keys: Sequence[bytes], workers: Iterable[int], now_ms: float) -> dict[int, int]:
        del now_ms  # events say when a block leaves; nothing expires
        holders = self.holders
        empty: set[int] = set()
        return _walk(keys, workers, lambda key, cands: cands.intersection(holders.get(key, empty)))

    def num_keys(self, worker_id: int) -> int:
        return len(self.keys_of.get(worker_id, ()))


class ApproxIndex:
    """Block key -> {worker: expiry}, kept from the router's own decisions.

    With ``capacity_blocks`` the index also models each worker's pool as an LRU of that many
    blocks (a request's tail first, so its head is the most recent, as a worker frees them),
    so a key the worker must have evicted by now stops counting before its TTL runs out.
    """

    def __init__(self, ttl_ms: float, capacity_blocks: int | None = None) -> None:
        self.ttl_ms = ttl_ms
        self.capacity_blocks = capacity_blocks
        self.holders: dict[bytes, dict[int, float]] = {}
        self.lru: dict[int, OrderedDict[bytes, None]] = {}
        self._next_sweep_ms = ttl_ms

    def record(self, worker_id: int, keys: Sequence[bytes], now_ms: float) -> None:
        expiry = now_ms + self.ttl_ms
        holders = self.holders
        for key in keys:
            held = holders.get(key)
            if held is None:
                holders[key] = {worker_id: expiry}
            else:
                held[worker_id] = expiry
        cap = self.capacity_blocks
        if cap is not None:
            lru = self.lru.setdefault(worker_id, OrderedDict())
            for key in reversed(keys):
                lru[key] = None
                lru.move_to_end(key)
            while len(lru) > cap:
                old, _ = lru.popitem(last=False)
                held = holders.get(old)
                if held is not None and held.pop(worker_id, None) is not None and not held:
                    del holders[old]
        if now_ms >= self._next_sweep_ms:
            self._sweep(now_ms)

    def _sweep(self, now_ms: float) -> None:
        """Drop expired entries, at most once per TTL, so memory tracks what is live."""
        for key in list(self.holders):
            held = self.holders[key]
            for w in [w for w, t in held.items() if t <= now_ms]:
                del held[w]
            if not held:
                del self.holders[key]
        self._next_sweep_ms = now_ms + self.ttl_ms

    def remove_worker(self, worker_id: int) -> None:
        self.lru.pop(worker_id, None)
        for key in list(self.holders):
            held = self.holders[key]
            if held.pop(worker_id, None) is not None and not held:
                del self.holders[key]

    def overlaps(self, keys: Sequence[bytes], workers: Iterable[int], now_ms: float) -> dict[int, int]:
        holders = self.holders

        def holding(key: bytes, cands: set[int]) -> set[int]:
            held = holders.get(key)
            return {w for w in cands if held.get(w, -1.0) > now_ms} if held else set()

        return _walk(keys, workers, holding)

    def num_keys(self, worker_id: int) -> int:
        return sum(worker_id in held for held in self.holders.values())
