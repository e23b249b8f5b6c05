"""What the router believes each worker caches: which workers hold each block key.

Two ways to learn it, never by reading a worker's internals:

- ``PreciseIndex`` applies the workers' ``BlockStored``/``BlockRemoved`` events (however late
  they arrive: the delay is the transport's, modelled by the replay).
- ``ApproxIndex`` records the router's own decisions: routing a request to a worker is taken to
  cache its blocks there for ``ttl_ms`` (SGLang's gateway keeps such a tree, Dynamo's router has
  the same mode without events).

Both answer one question: for a request's block keys, how many leading keys each worker holds
(the prefix overlap, in blocks). The answer is sparse: only workers with an overlap of at least
one block appear; a worker missing from it holds no prefix of the request. Chains make a key
imply its whole prefix, so the walk starts from the workers holding the first key and stops at
the first key none of them holds: a lookup never visits a worker that does not match.
Policies are elsewhere (``policies``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from kvcache.cache.events import BlockStored, CacheEvent
from kvcache.cache.lru import LRU
from kvcache.errors import ConfigError
from kvcache.router.policies import WorkerId

# A lookup whose matching workers number at most this decodes their bits in Python; above it
# one numpy pass over the layers is cheaper than a Python step per worker.
_PY_DECODE_MAX = 24


def _walk(
    keys: Sequence[bytes], first: set[WorkerId], holding: Callable[[bytes, set[WorkerId]], set[WorkerId]]
) -> dict[WorkerId, int]:
    """Leading keys each of ``first`` (the holders of ``keys[0]``) holds, for those holding one
    or more; ``holding(key, candidates)`` says which candidates hold key."""
    overlap: dict[WorkerId, int] = {}
    if not first:
        return overlap
    candidates = first
    depth = 1
    for i in range(1, len(keys)):
        held = holding(keys[i], candidates)
        if len(held) != len(candidates):
            for w in candidates - held:
                overlap[w] = depth
            if not held:
                return overlap
            candidates = held
        depth += 1
    for w in candidates:
        overlap[w] = depth
    return overlap


class PreciseIndex:
    """Block key -> the set of workers holding it, kept from worker events.

    Each worker owns one bit (its slot); a key's holders are one Python int with a bit per
    holder, so a step of the prefix walk is one word-parallel AND over the fleet (16 machine
    words at 1,024 workers) instead of a set operation per worker. The walk records the layers
    where workers drop out (those holding exactly ``depth`` leading keys); only the layers'
    bits are decoded into worker ids.
    """

    def __init__(self) -> None:
        self.holders: dict[bytes, int] = {}  # key -> bitmask of the slots holding it (never 0)
        self.keys_of: dict[WorkerId, set[bytes]] = {}
        self._slot_of: dict[WorkerId, int] = {}
        self._worker_at: list[WorkerId | None] = []  # slot -> worker id, None for a free slot
        self._free: list[int] = []
        # _worker_at as an array, for decoding; dtype object: worker ids are whatever the caller
        # uses (ints in the replay, names in serve)
        self._worker_ids = np.empty(0, dtype=object)

    @property
    def num_slots(self) -> int:
        """Slots handed out so far (free ones included): every slot number is below it."""
        return len(self._worker_at)

    def slot(self, worker_id: WorkerId) -> int:
        """The worker's slot (its bit), given out on first sight and reused after removal."""
        slot = self._slot_of.get(worker_id)
        if slot is None:
            if self._free:
                slot = self._free.pop()
                self._worker_at[slot] = worker_id
            else:
                slot = len(self._worker_at)
                self._worker_at.append(worker_id)
                ids = np.empty(slot + 1, dtype=object)
                ids[:slot] = self._worker_ids
                self._worker_ids = ids
            self._worker_ids[slot] = worker_id
            self._slot_of[worker_id] = slot
        return slot

    def apply(self, worker_id: WorkerId, events: Iterable[CacheEvent]) -> None:
        bit = 1 << self.slot(worker_id)
        keys = self.keys_of.setdefault(worker_id, set())
        holders = self.holders
        for event in events:
            key = event.key
            if isinstance(event, BlockStored):
                holders[key] = holders.get(key, 0) | bit
                keys.add(key)
            else:
                held = holders.get(key)
                if held is not None and held & bit:
                    if held == bit:
                        del holders[key]
                    else:
                        holders[key] = held ^ bit
                keys.discard(key)

    def remove_worker(self, worker_id: WorkerId) -> None:
        slot = self._slot_of.pop(worker_id, None)
        keys = self.keys_of.pop(worker_id, set())
        if slot is None:
            return
        bit, holders = 1 << slot, self.holders
        for key in keys:
            held = holders[key] ^ bit
            if held:
                holders[key] = held
            else:
                del holders[key]
        self._worker_at[slot] = None
        self._worker_ids[slot] = None
        self._free.append(slot)

    def overlaps(self, keys: Sequence[bytes], now_ms: float) -> dict[WorkerId, int]:
        """{worker id: leading keys held}, for the workers holding at least the first key."""
        del now_ms  # events say when a block leaves; nothing expires
        layers, matching = self._layers(keys)
        if matching.bit_count() <= _PY_DECODE_MAX:
            worker_at = self._worker_at
            return {worker_at[s]: d for s, d in self._decode_each(layers)}
        slots, depths = self._decode_all(layers)
        return dict(zip(self._worker_ids[slots].tolist(), depths.tolist(), strict=True))

    def overlap_slots(self, keys: Sequence[bytes], now_ms: float) -> tuple[np.ndarray, np.ndarray]:
        """``overlaps`` as two arrays, the matching workers' slots and their overlaps (for a
        caller that keeps its own arrays by slot, as the router does: no dict per lookup)."""
        del now_ms
        layers, matching = self._layers(keys)
        if matching.bit_count() <= _PY_DECODE_MAX:
            pairs = list(self._decode_each(layers))
            return np.array([s for s, _ in pairs], np.int64), np.array([d for _, d in pairs], np.int64)
        return self._decode_all(layers)

    def _layers(self, keys: Sequence[bytes]) -> tuple[list[tuple[int, int]], int]:
        """The prefix walk: (depth, slots holding exactly ``depth`` leading keys) for each depth
        where workers drop out, and the union of those slots (the holders of the first key)."""
        holders = self.holders
        mask = first = holders.get(keys[0], 0) if keys else 0
        layers: list[tuple[int, int]] = []
        if not mask:
            return layers, 0
        depth = 1
        for i in range(1, len(keys)):
            held = mask & holders.get(keys[i], 0)
            if held != mask:
                layers.append((depth, mask ^ held))
                if not held:
                    return layers, first
                mask = held
            depth += 1
        layers.append((depth, mask))
        return layers, first

    @staticmethod
    def _decode_each(layers: list[tuple[int, int]]) -> Iterable[tuple[int, int]]:
        """(slot, depth) bit by bit: cheapest for a few matching workers."""
        for depth, m in layers:
            while m:
                low = m & -m
                yield low.bit_length() - 1, depth
                m ^= low

    def _decode_all(self, layers: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """(slots, depths) of every matching worker in one numpy pass over the layers."""
        if not layers:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        num_bytes = (len(self._worker_at) + 7) // 8
        rows = np.frombuffer(b"".join(m.to_bytes(num_bytes, "little") for _, m in layers), np.uint8)
        bits = np.unpackbits(rows.reshape(len(layers), num_bytes), axis=1, bitorder="little")
        # The layers are disjoint, so each slot's depth is its one layer's: a weighted sum of the
        # bit rows. float32 keeps it a BLAS product and holds every depth below 2**24 exactly.
        weights = np.array([d for d, _ in layers], dtype=np.float32)
        depths = (weights @ bits.astype(np.float32)).astype(np.int64)
        slots = np.flatnonzero(depths)
        return slots, depths[slots]

    def num_keys(self, worker_id: WorkerId) -> int:
        return len(self.keys_of.get(worker_id, ()))


class ApproxIndex:
    """Block key -> {worker: expiry}, kept from the router's own decisions.

    With ``capacity_blocks`` the index also models each worker's pool as an LRU of that many
    blocks (a request's tail first, so its head is the most recent, as a worker frees them),
    so a key the worker must have evicted by now stops counting before its TTL runs out.
    """

    def __init__(self, ttl_ms: float, capacity_blocks: int | None = None) -> None:
        if capacity_blocks is not None and (not isinstance(capacity_blocks, int) or capacity_blocks < 1):
            raise ConfigError(f"capacity_blocks={capacity_blocks!r} must be an integer >= 1 or None")
        self.ttl_ms = ttl_ms
        self.capacity_blocks = capacity_blocks
        self.holders: dict[bytes, dict[WorkerId, float]] = {}
        self.lru: dict[WorkerId, LRU[bytes, None]] = {}
        self._next_sweep_ms = ttl_ms

    def record(self, worker_id: WorkerId, keys: Sequence[bytes], now_ms: float) -> None:
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
            lru = self.lru.get(worker_id)
            if lru is None:
                lru = self.lru[worker_id] = LRU(cap)
            for old, _ in lru.extend((key, None) for key in reversed(keys)):
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

    def remove_worker(self, worker_id: WorkerId) -> None:
        self.lru.pop(worker_id, None)
        for key in list(self.holders):
            held = self.holders[key]
            if held.pop(worker_id, None) is not None and not held:
                del self.holders[key]

    def overlaps(self, keys: Sequence[bytes], now_ms: float) -> dict[WorkerId, int]:
        holders = self.holders

        def holding(key: bytes, cands: set[WorkerId]) -> set[WorkerId]:
            held = holders.get(key)
            return {w for w in cands if held.get(w, -1.0) > now_ms} if held else set()

        first = holders.get(keys[0]) if keys else None
        if not first:
            return {}
        return _walk(keys, {w for w, t in first.items() if t > now_ms}, holding)

    def num_keys(self, worker_id: WorkerId) -> int:
        return sum(worker_id in held for held in self.holders.values())
