"""What the router believes each worker caches: which workers hold each block key.

Two ways to learn it, never by reading a worker's internals:

- ``PreciseIndex`` applies the workers' ``BlockStored``/``BlockRemoved`` events (however late
  they arrive: the delay is the transport's, modelled by the replay), and bounds each worker's
  keys to its pool size when told it, dropping the least recently stored first.
- ``ApproxIndex`` records the router's own decisions: routing a request to a worker is taken to
  cache its blocks there for ``ttl_ms`` (SGLang's gateway keeps such a tree, Dynamo's router has
  the same mode without events).

Both answer one question: for a request's block keys, how many leading keys each worker holds
(the prefix overlap, in blocks). The answer is sparse: only workers with an overlap of at least
one block appear; a worker missing from it holds no prefix of the request. Chains make a key
imply its whole prefix, so the walk starts from the workers holding the first key and stops at
the first key none of them holds: a lookup never visits a worker that does not match.

This is the one index of which workers hold which keys: the router owns it (``Router.index``),
``kvcache serve``'s front applies its workers' events to it (``serve.pool``) and ``kvcache route``
its engines' vLLM events (``vllm.subscriber``). Not here: policies (``policies``), load
accounting (``router``), transports and their trust checks (``serve.pool``, ``vllm``).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from functools import reduce
from itertools import accumulate, groupby, islice, repeat
from operator import and_, attrgetter, xor
from typing import Literal

import numpy as np

from kvcache.cache.events import BlockStored, CacheEvent
from kvcache.cache.lru import LRU
from kvcache.errors import ConfigError
from kvcache.router.policies import WorkerId

# A lookup whose matching workers number at most this decodes their bits in Python; above it
# one numpy pass over a few bit planes is cheaper than a Python step per worker.
_PY_DECODE_MAX = 24
# Keys the prefix walk looks up per C-level pass; it stops after the pass where the last holder
# dropped out, so a long prompt of which only the first blocks match costs one pass, not its length.
_WALK_CHUNK = 64
# 2**b for bit plane b: float32 holds every depth below 2**24 exactly, float64 below 2**53.
_PLANE_WEIGHTS = 2.0 ** np.arange(53)
_PLANE_WEIGHTS_F32 = _PLANE_WEIGHTS[:24].astype(np.float32)
_PLANE_WEIGHTS.setflags(write=False)
_PLANE_WEIGHTS_F32.setflags(write=False)
_KEY = attrgetter("key")


def _check_capacity(capacity_blocks: int | None) -> None:
    bad = isinstance(capacity_blocks, bool) or not isinstance(capacity_blocks, int) or capacity_blocks < 1
    if capacity_blocks is not None and bad:
        raise ConfigError(
            f"capacity_blocks={capacity_blocks!r} must be an integer >= 1 (the worker's KV blocks) or None"
        )


@dataclass(slots=True)
class IndexChange:
    """What one ``PreciseIndex.apply`` changed for its worker, each list in the order it
    happened: the keys it came to hold (storing a key it held only refreshes it), and the keys it
    stopped holding (removed, or pushed out by its bound). A key stored and then dropped by the
    same call is in both."""

    gained: list[bytes] = field(default_factory=list)
    lost: list[bytes] = field(default_factory=list)


def _walk_few(
    keys: Sequence[bytes], first: int, get: Callable[[bytes, int], int]
) -> tuple[list[int], list[int]]:
    """The prefix walk for a few matching workers (the holders of ``keys[0]``, ``first``), in
    Python: (slots, depths), decoded bit by bit at each depth where workers drop out."""
    slots: list[int] = []
    depths: list[int] = []

    def add(layer: int, depth: int) -> None:  # the slots holding exactly ``depth`` leading keys
        while layer:
            low = layer & -layer
            slots.append(low.bit_length() - 1)
            depths.append(depth)
            layer ^= low

    mask, depth = first, 1
    for key in islice(keys, 1, None):
        held = mask & get(key, 0)
        if held != mask:
            add(mask ^ held, depth)
            if not held:
                return slots, depths
            mask = held
        depth += 1
    add(mask, depth)
    return slots, depths


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
    """Block key -> the set of workers holding it, kept from worker events; optionally bounded.

    Each worker owns one bit (its slot); a key's holders are one Python int with a bit per
    holder, so a step of the prefix walk is one word-parallel AND over the fleet (16 machine
    words at 1,024 workers) instead of a set operation per worker.

    Each worker's keys are also kept in least-recently-stored order (``keys_of``, an ``LRU``),
    and with a bound (``capacity_blocks``: the index's default, or one per worker given to
    ``add_worker``) a worker never holds more keys than its pool could: past it the oldest go
    first, and storing a key it holds refreshes it. The bound is enforced once after each
    ``apply``, so a batch that stores a block before reporting the eviction that made room for
    it loses nothing, while a flood (lost events, or forged ones) still cannot grow a worker's
    keys past its bound. Invariant: a key's bit for a worker is set exactly when the key is in
    that worker's ``keys_of``.
    """

    def __init__(self, capacity_blocks: int | None = None) -> None:
        _check_capacity(capacity_blocks)
        self.capacity_blocks = capacity_blocks
        self.holders: dict[bytes, int] = {}  # key -> bitmask of the slots holding it (never 0)
        self.keys_of: dict[WorkerId, LRU[bytes, None]] = {}  # least recently stored first
        self._bound: dict[WorkerId, int | None] = {}
        self._slot_of: dict[WorkerId, int] = {}
        self._worker_at: list[WorkerId | None] = []  # slot -> worker id, None for a free slot
        self._free: list[int] = []
        # _worker_at as an array, for decoding; dtype object: worker ids are whatever the caller
        # uses (ints in the replay, names in serve)
        self._worker_ids = np.empty(0, dtype=object)
        self._num_bytes = 0  # bytes of a bitmask over every slot handed out

    # ---- workers ---------------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        """Slots handed out so far (free ones included): every slot number is below it."""
        return len(self._worker_at)

    def slot(self, worker_id: WorkerId) -> int:
        """The worker's slot (its bit), given out on first sight (bounded by the index's
        ``capacity_blocks``) and reused after ``remove_worker``."""
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
                self._num_bytes = (slot + 8) // 8
            self._worker_ids[slot] = worker_id
            self._slot_of[worker_id] = slot
            self.keys_of[worker_id] = LRU()
            self._bound[worker_id] = self.capacity_blocks
        return slot

    def add_worker(self, worker_id: WorkerId, capacity_blocks: int | None = None) -> int:
        """The worker's slot, with its own bound (None: the index's ``capacity_blocks``). A known
        worker keeps its keys but those past a smaller bound, oldest first."""
        _check_capacity(capacity_blocks)
        slot = self.slot(worker_id)
        bound = self._bound[worker_id] = self.capacity_blocks if capacity_blocks is None else capacity_blocks
        if bound is not None and len(self.keys_of[worker_id]) > bound:
            self.forget(worker_id, len(self.keys_of[worker_id]) - bound)
        return slot

    def remove_worker(self, worker_id: WorkerId) -> None:
        """Forget the worker and free its slot for the next one."""
        if worker_id not in self._slot_of:
            return
        self.clear(worker_id)
        slot = self._slot_of.pop(worker_id)
        del self.keys_of[worker_id], self._bound[worker_id]
        self._worker_at[slot] = None
        self._worker_ids[slot] = None
        self._free.append(slot)

    # ---- events ----------------------------------------------------------------------------

    def apply(self, worker_id: WorkerId, events: Iterable[CacheEvent]) -> IndexChange:
        """A worker's ``BlockStored``/``BlockRemoved`` events, in order, then its bound."""
        runs = groupby(events, type)
        return self.apply_keys(worker_id, ((kind is BlockStored, map(_KEY, run)) for kind, run in runs))

    def apply_keys(self, worker_id: WorkerId, runs: Iterable[tuple[bool, Iterable[bytes]]]) -> IndexChange:
        """Runs of keys, in order: ``(True, keys)`` the worker stored them (a key it holds is
        refreshed), ``(False, keys)`` it removed them (a key it does not hold is ignored); then
        the oldest keys past the worker's bound are dropped."""
        bit = 1 << self.slot(worker_id)
        lru, holders = self.keys_of[worker_id], self.holders
        change = IndexChange()
        gained, lost = change.gained, change.lost
        for stored, keys in runs:
            if stored:
                keys = list(keys)
                for key in keys:
                    held = holders.get(key, 0)
                    now_held = held | bit
                    if now_held != held:  # a compare, not another big int: cheaper than held & bit
                        holders[key] = now_held
                        gained.append(key)
                lru.extend(zip(keys, repeat(None)))
            else:
                for key in keys:
                    held = holders.get(key, 0)
                    if held & bit:
                        lru.pop(key)
                        if held == bit:
                            del holders[key]
                        else:
                            holders[key] = held ^ bit
                        lost.append(key)
        bound = self._bound[worker_id]
        if bound is not None and len(lru) > bound:
            lost += self.forget(worker_id, len(lru) - bound)
        return change

    def forget(self, worker_id: WorkerId, max_keys: int) -> list[bytes]:
        """Drop up to ``max_keys`` of the worker's keys, least recently stored first (a clear in
        slices, or the bound); returns them. The worker keeps its slot."""
        lru = self.keys_of.get(worker_id)
        if lru is None or max_keys <= 0:
            return []
        bit, holders = 1 << self._slot_of[worker_id], self.holders
        gone = [lru.pop_oldest()[0] for _ in range(min(max_keys, len(lru)))]
        for key in gone:
            held = holders[key] ^ bit
            if held:
                holders[key] = held
            else:
                del holders[key]
        return gone

    def clear(self, worker_id: WorkerId) -> list[bytes]:
        """Drop every key of the worker (it keeps its slot); returns them, oldest first."""
        return self.forget(worker_id, self.num_keys(worker_id))

    # ---- lookups ---------------------------------------------------------------------------

    def overlaps(self, keys: Sequence[bytes], now_ms: float) -> dict[WorkerId, int]:
        """{worker id: leading keys held}, for the workers holding at least the first key."""
        del now_ms  # events say when a block leaves; nothing expires
        found = self._depths(keys)
        if isinstance(found, tuple):
            worker_at = self._worker_at
            return {worker_at[s]: d for s, d in zip(*found, strict=True)}
        slots = np.flatnonzero(found)
        return dict(zip(self._worker_ids[slots].tolist(), found[slots].tolist(), strict=True))

    def overlap_by_slot(self, keys: Sequence[bytes], now_ms: float) -> np.ndarray:
        """``overlaps`` as one int64 array indexed by slot (0: no prefix held, or a free slot),
        for a caller that keeps its own arrays by slot, as the router does: one gather, no
        dict per lookup."""
        del now_ms
        found = self._depths(keys)
        if not isinstance(found, tuple):
            return found
        depths = np.zeros(self.num_slots, np.int64)
        depths[found[0]] = found[1]
        return depths

    def _depths(self, keys: Sequence[bytes]) -> tuple[list[int], list[int]] | np.ndarray:
        """The matching workers' (slots, depths) when they are few (``_walk_few``), else every
        slot's depth as an array (the walk in C, then bit planes)."""
        get = self.holders.get
        first = get(keys[0], 0) if keys else 0
        if first.bit_count() <= _PY_DECODE_MAX:
            return _walk_few(keys, first, get) if first else ([], [])
        return self._decode_planes(self._prefix_masks(keys, first))

    def _prefix_masks(self, keys: Sequence[bytes], first: int) -> list[int]:
        """The prefix walk in C (``map`` over the dict, ``accumulate`` of the ANDs): ``masks[i]``
        holds the slots holding each of ``keys[: i + 1]`` (``first``: those holding ``keys[0]``;
        nested, each a subset of the one before), up to the first empty one or the last key. It
        runs a chunk of keys at a time and stops after the chunk where the last holder dropped
        out."""
        get = self.holders.get
        masks = list(accumulate(map(get, keys[1:_WALK_CHUNK], repeat(0)), and_, initial=first))
        start = _WALK_CHUNK
        while masks[-1] and start < len(keys):
            chunk = map(get, keys[start : start + _WALK_CHUNK], repeat(0))
            masks += accumulate(chunk, and_, initial=masks.pop())
            start += _WALK_CHUNK
        return masks

    def _decode_planes(self, masks: list[int]) -> np.ndarray:
        """Every slot's depth (leading keys held) in one numpy pass, whatever the fleet.

        The masks are nested, so a slot's depth is the number of masks holding it, and bit b of
        the depth is the parity of how many of the masks at positions ``j * 2**b - 1`` (j >= 1)
        hold it: XOR-ing those masks gives the plane of slots whose depth has bit b set. Plane b
        is plane b + 1 XOR the masks at odd multiples of ``2**b``, less one, so all the planes
        cost ``len(masks)`` big-int XORs (in C), and numpy unpacks and weighs only
        ``log2(len(masks)) + 1`` rows of bits, however many workers match.
        """
        num_planes = len(masks).bit_length()
        planes = [0] * num_planes
        plane = 0
        for b in reversed(range(num_planes)):
            plane ^= reduce(xor, masks[(1 << b) - 1 :: 2 << b], 0)
            planes[b] = plane
        little: Literal["little"] = "little"
        raw = b"".join(map(int.to_bytes, planes, repeat(self._num_bytes), repeat(little)))
        bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little").reshape(num_planes, -1)
        weights = _PLANE_WEIGHTS_F32 if num_planes <= len(_PLANE_WEIGHTS_F32) else _PLANE_WEIGHTS
        depths: np.ndarray = np.dot(weights[:num_planes], bits.astype(weights.dtype))  # one BLAS product
        return depths[: self.num_slots].astype(np.int64)

    def overlap(self, worker_id: WorkerId, keys: Iterable[bytes]) -> int:
        """Leading ``keys`` one worker holds."""
        held: Container[bytes] = self.keys_of.get(worker_id, ())
        n = 0
        for key in keys:
            if key not in held:
                break
            n += 1
        return n

    def num_keys(self, worker_id: WorkerId) -> int:
        return len(self.keys_of.get(worker_id, ()))

    def check(self) -> None:
        """Assert the invariants (tests call it after each mutation)."""
        for worker_id, slot in self._slot_of.items():
            bit, lru = 1 << slot, self.keys_of[worker_id]
            bound = self._bound[worker_id]
            assert bound is None or len(lru) <= bound, (worker_id, len(lru), bound)
            assert all(self.holders[key] & bit for key in lru), worker_id
        held = sum(len(self.keys_of[w]) for w in self._slot_of)
        assert held == sum(m.bit_count() for m in self.holders.values()), "a bit without a key"
        assert all(self._worker_at[s] == w for w, s in self._slot_of.items())


class ApproxIndex:
    """Block key -> {worker: expiry}, kept from the router's own decisions.

    With ``capacity_blocks`` the index also models each worker's pool as an LRU of that many
    blocks (a request's tail first, so its head is the most recent, as a worker frees them),
    so a key the worker must have evicted by now stops counting before its TTL runs out.
    """

    def __init__(self, ttl_ms: float, capacity_blocks: int | None = None) -> None:
        _check_capacity(capacity_blocks)
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
