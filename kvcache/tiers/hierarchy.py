"""The spill hierarchy an engine uses: tiers below the device pool, fastest first.

    hierarchy = Hierarchy(layout, [HostTier(layout, 4096), DiskTier("/var/kv", 65536), icms])
    manager.set_evict_hook(hierarchy.evict_hook(pool))      # offload: write-back on eviction
    n = hierarchy.lookup_prefix(keys[num_cached_blocks:])   # blocks some tier holds
    packed = hierarchy.load(keys[num_cached_blocks:][:n])   # [m, L, 2, block_size, kv_heads, head_dim]
    m = hierarchy.restore(pool, new_block_ids, keys[num_cached_blocks:])   # or straight into the pool

- Offload on eviction: the evict hook stores the device block in the first tier; a full private
  tier (G2, G3) hands its least recently used block to the next one (``Tier.on_evict``), the
  last one drops it. Every offloaded block is also written behind to the shared tier (ICMS), so
  another worker of the pod can load it instead of recomputing.
- Promote on hit: a block loaded from a slower tier is copied into the first tier.
- Prefetch on a routing decision: ``prefetch(keys)`` prestages blocks of the shared tier and
  promotes disk blocks into host memory before the request's prefill needs them; ``promote(keys)``
  brings blocks of every lower tier, the shared one included, into the first tier (the engine's
  waiting requests, ``kvcache.engine.prefetch``), so their load at admission runs at its speed.
- Threads: every method holds ``lock`` (re-entrant) while it touches a tier, so an engine's step
  thread and a prefetch thread can share one hierarchy. Tiers have no locks of their own: touch
  them through the hierarchy, or hold ``lock``.
- Cost rule: with ``TierPolicy.prefill`` set, ``load`` brings only the leading blocks whose
  transfer beats recomputing them (``policy.best_load_prefix``).

A block found damaged (or lost) on the way is a counted miss in its tier, and ``load`` tries the
next tier holding a copy; only when none is left does it return fewer blocks than asked, and the
caller recomputes from there. Block keys are wrapped with the layout fingerprint here; callers
pass plain 16-byte keys.

Not here: the device pool and which blocks a request uses (the engine and its block manager).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvcache.errors import TierError
from kvcache.kernels.dispatch import unpack_blocks
from kvcache.tiers.base import LayoutFingerprint, Tier, TierKey, TierStats, TransferModel
from kvcache.tiers.policy import TierPolicy, best_load_prefix

log = logging.getLogger(__name__)


@dataclass(slots=True)
class HierarchyStats:
    tiers: dict[str, TierStats]
    loads: int = 0  # ``load`` calls that brought back at least one block
    blocks_loaded: int = 0
    blocks_promoted: int = 0
    blocks_offloaded: int = 0
    blocks_prefetched: int = 0
    blocks_declined: int = 0  # held by a tier but cheaper to recompute (cost rule)
    offload_errors: int = 0
    stall_ms: float = 0.0  # wall time spent inside ``load``
    prefill_tokens_saved: int = 0


@dataclass(frozen=True, slots=True)
class Promoted:
    """What ``promote`` did: ``held`` leading keys some tier holds, ``moved`` the keys among them
    copied into the first tier (the others were there already, or failed to load: ``failed``)."""

    held: int
    moved: list[bytes]
    failed: int


class Hierarchy:
    def __init__(
        self,
        layout: LayoutFingerprint,
        tiers: Sequence[Tier],
        policy: TierPolicy | None = None,
        transfer: Sequence[TransferModel] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        block_nbytes: int | None = None,
    ) -> None:
        if not tiers:
            raise TierError("a hierarchy needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise TierError(f"tier names must be unique, got {names}; give each tier its own name")
        if transfer is not None and len(transfer) != len(tiers):
            raise TierError(f"{len(transfer)} transfer models for {len(tiers)} tiers; pass one per tier")
        policy = policy or TierPolicy()
        if policy.prefill is not None and transfer is None:
            raise TierError("the cost rule (policy.prefill) needs one TransferModel per tier (transfer=...)")
        self.layout = layout
        self.tiers = list(tiers)
        self.policy = policy
        self.transfer = list(transfer) if transfer is not None else None
        # Bytes one block moves over a tier's link, for the cost rule: the layout's, unless the
        # tiers stand for blocks of another size (the replay's simulated tiers hold keys only).
        self.block_nbytes = layout.block_nbytes if block_nbytes is None else block_nbytes
        self._clock = clock
        self._stats = HierarchyStats(tiers={})
        # Guards every tier and the counters: held by each public method for its whole run.
        self.lock = threading.RLock()
        # Private tiers form a chain: a full one demotes its oldest block to the next. Shared
        # tiers (ICMS) get every offloaded block written behind, so other workers can load it.
        private = [t for t in self.tiers if not t.shared]
        self.shared = [t for t in self.tiers if t.shared]
        for upper, lower in itertools.pairwise(private):
            upper.on_evict = lower.store
        if private:
            private[-1].on_evict = None

    def _keys(self, keys: Sequence[bytes]) -> list[TierKey]:
        layout = self.layout
        return [TierKey(k, layout) for k in keys]

    def _locate(self, tkeys: Sequence[TierKey], window: int = 64) -> list[int]:
        """For each leading key some tier holds, the index of the fastest tier holding it.

        Keys are checked ``window`` at a time (one batched call per tier and window, a single
        round trip for a remote tier), stopping at the first window with a key no tier holds."""
        where: list[int] = []
        for start in range(0, len(tkeys), window):
            part = tkeys[start : start + window]
            found = [-1] * len(part)
            for t, tier in enumerate(self.tiers):
                idx = [i for i, w in enumerate(found) if w < 0]
                if not idx:
                    break
                for i, held in zip(idx, tier.contains_many([part[i] for i in idx]), strict=True):
                    if held:
                        found[i] = t
            if -1 in found:
                return where + found[: found.index(-1)]
            where += found
        return where

    # ---- the engine's interface --------------------------------------------------------------

    def lookup_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` some tier holds."""
        with self.lock:
            return len(self._locate(self._keys(keys)))

    def load(self, keys: Sequence[bytes], context_tokens: int = 0) -> torch.Tensor:
        """The leading blocks of ``keys`` the tiers hold (and the cost rule accepts), block-major
        ``[m, L, 2, block_size, kv_heads, head_dim]``, ``m <= len(keys)``."""
        with self.lock:
            return self._load(keys, context_tokens)

    def _load(self, keys: Sequence[bytes], context_tokens: int) -> torch.Tensor:
        started = self._clock()
        tkeys = self._keys(keys)
        where = self._locate(tkeys)
        stats = self._stats
        if where and self.policy.prefill is not None and self.transfer is not None:
            sources = [self.transfer[t] for t in where]
            n, _ = best_load_prefix(
                sources, self.block_nbytes, self.layout.block_size, context_tokens, self.policy.prefill
            )
            stats.blocks_declined += len(where) - n
            where = where[:n]
        out = torch.empty((len(where), *self.layout.block_shape), dtype=self.layout.torch_dtype)
        good = len(where)
        where = list(where)
        todo = list(range(len(where)))
        while todo:
            failed: list[int] = []
            for t, tier in enumerate(self.tiers):
                idx = [i for i in todo if where[i] == t]
                if idx:
                    got = tier.load_many([tkeys[i] for i in idx], [out[i] for i in idx])
                    failed += [i for i, block in zip(idx, got, strict=True) if block is None]
            todo = []
            for i in sorted(failed):  # damaged or lost on the way: try a slower tier's copy
                lower = [t for t in range(where[i] + 1, len(self.tiers)) if self.tiers[t].contains(tkeys[i])]
                if lower and i < good:
                    where[i] = lower[0]
                    todo.append(i)
                else:
                    good = min(good, i)  # no copy left: recompute from here
            todo = [i for i in todo if i < good]
        out = out[:good]
        if self.policy.promote_on_hit and good:
            first = self.tiers[0]
            for i in range(good):
                if where[i] > 0:
                    first.store(tkeys[i], out[i])
                    stats.blocks_promoted += 1
        if good:
            stats.loads += 1
        stats.blocks_loaded += good
        stats.prefill_tokens_saved += good * self.layout.block_size
        stats.stall_ms += (self._clock() - started) * 1e3
        return out

    def restore(
        self, pool: torch.Tensor, block_ids: Sequence[int], keys: Sequence[bytes], context_tokens: int = 0
    ) -> int:
        """Load the leading held ``keys`` straight into blocks ``block_ids`` of ``pool``
        ``[L, 2, num_blocks, block_size, kv_heads, head_dim]`` (an engine's freshly allocated
        blocks after its device hit); returns how many blocks were restored."""
        if len(block_ids) != len(keys):
            raise TierError(f"{len(block_ids)} block ids for {len(keys)} keys; pass one id per key")
        packed = self.load(keys, context_tokens)  # [m, L, 2, block_size, kv_heads, head_dim]
        m = packed.shape[0]
        if m:
            ids = torch.tensor(list(block_ids[:m]), dtype=torch.long, device=pool.device)
            unpack_blocks(pool, ids, packed.to(pool.device, non_blocking=True))
        return m

    def store(self, keys: Sequence[bytes], packed: torch.Tensor) -> None:
        """Store blocks ``packed`` ``[n, L, 2, block_size, kv_heads, head_dim]`` in the first tier."""
        if packed.dim() != 6 or packed.shape[0] != len(keys):
            raise TierError(
                f"packed {tuple(packed.shape)} must be [{len(keys)}, *{list(self.layout.block_shape)}]"
            )
        with self.lock:
            for key, block in zip(self._keys(keys), packed, strict=True):
                self._offload(key, block)
            self._stats.blocks_offloaded += len(keys)

    def _offload(self, key: TierKey, block: torch.Tensor) -> None:
        self.tiers[0].store(key, block)
        for tier in self.shared:
            if tier is not self.tiers[0]:
                tier.store(key, block)

    def remove(self, keys: Sequence[bytes]) -> int:
        """Drop ``keys`` from every tier (e.g. invalidated KV); returns how many copies went."""
        tkeys = self._keys(keys)
        with self.lock:
            return sum(tier.remove_many(tkeys) for tier in self.tiers)

    def evict_hook(self, pool: torch.Tensor) -> Callable[[int, bytes], None]:
        """A ``BlockManager.set_evict_hook`` callback that writes evicted blocks of ``pool``
        ``[L, 2, num_blocks, block_size, kv_heads, head_dim]`` down before their slot is reused."""
        layout = LayoutFingerprint.of_pool(self.layout.model_id, pool, self.layout.weights)
        if layout != self.layout:
            raise TierError(f"pool layout {layout} differs from the hierarchy's {self.layout}")
        stats = self._stats

        def hook(block_id: int, key: bytes) -> None:
            if not self.policy.offload_on_evict:
                return
            try:
                with self.lock:
                    self._offload(TierKey(key, layout), pool[:, :, block_id])
                    stats.blocks_offloaded += 1
            except Exception:  # a hook must not raise inside an allocation; the block is only lost
                stats.offload_errors += 1
                log.exception("offload of evicted block %d failed; it will be recomputed", block_id)

        return hook

    def prefetch(self, keys: Sequence[bytes]) -> int:
        """Move the leading held ``keys`` towards the first tier ahead of need; returns how many."""
        if not self.policy.prefetch_on_route:
            return 0
        with self.lock:
            return len(self._move_up(self._keys(keys), stage_shared=True)[0])

    def promote(self, keys: Sequence[bytes]) -> Promoted:
        """Copy the leading held ``keys`` that only lower tiers hold into the first tier, shared
        tier included (its blocks are verified on the way, not merely staged). A block that fails
        to load (damaged, lost, backend down) is counted in its tier and left where it was."""
        with self.lock:
            tkeys = self._keys(keys)
            moved, held, failed = self._move_up(tkeys, stage_shared=False)
            return Promoted(held, [tkeys[i].key for i in moved], failed)

    def _move_up(self, tkeys: list[TierKey], stage_shared: bool) -> tuple[list[int], int, int]:
        """(indices moved, leading keys held, blocks that failed to load); the caller holds the lock."""
        where = self._locate(tkeys)
        moved: list[int] = []
        failed = 0
        for t, tier in enumerate(self.tiers):
            idx = [i for i, w in enumerate(where) if w == t]
            if t == 0 or not idx:
                continue
            if stage_shared and tier.shared:
                moved += idx[: tier.prestage([tkeys[i] for i in idx])]
                continue
            for i, block in zip(idx, tier.load_many([tkeys[i] for i in idx]), strict=True):
                if block is not None:
                    self.tiers[0].store(tkeys[i], block)
                    moved.append(i)
                else:
                    failed += 1
        self._stats.blocks_prefetched += len(moved)
        return sorted(moved), len(where), failed

    def first_holds(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether the first tier holds each of ``keys`` now."""
        with self.lock:
            return self.tiers[0].contains_many(self._keys(keys))

    def flush(self) -> None:
        """Finish write-behind (the shared tier's buffered stores)."""
        with self.lock:
            for tier in self.tiers:
                tier.flush()

    def stats(self) -> HierarchyStats:
        with self.lock:
            return self._snapshot()

    def _snapshot(self) -> HierarchyStats:
        s = self._stats
        return HierarchyStats(
            tiers={t.name: t.stats for t in self.tiers},
            loads=s.loads,
            blocks_loaded=s.blocks_loaded,
            blocks_promoted=s.blocks_promoted,
            blocks_offloaded=s.blocks_offloaded,
            blocks_prefetched=s.blocks_prefetched,
            blocks_declined=s.blocks_declined,
            offload_errors=s.offload_errors,
            stall_ms=s.stall_ms,
            prefill_tokens_saved=s.prefill_tokens_saved,
        )
