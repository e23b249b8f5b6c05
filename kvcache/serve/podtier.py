"""The pod tier for served engines: every worker reads and writes one Redis-backed ICMS tier.

``PodTieredEngine`` is the HF engine with a ``kvcache.tiers.Hierarchy`` whose only tier is an
``IcmsTier`` over ``RedisBackend``. The engine itself loads the prefix blocks the tier holds
after its pool's hit, and writes evicted blocks down; for a pod of workers this adds:

- write-through: after prefill the prompt's newly computed full blocks are packed (a local
  copy), and ``write_through`` (which the worker calls once the request is answered, so Redis
  writes stay off its time to first token) stores and flushes them, so another worker's next
  request with the same prefix finds them;
- k-anonymity: requests of a share group under k > 1 never write to the tier either (the engine
  already keeps them from loading: ``Engine.tiers_gated``).

Keys are the block manager's (scope-rooted, so tenants never share tier entries). When Redis is
unreachable the tier answers misses and counts errors; requests never fail because of it.
``last_tier_errors`` is how many backend errors the last request met (the engine is
single-threaded). Write-through covers every prompt whose prefill finished since the last call.
"""

from __future__ import annotations

from typing import Any

import torch

from kvcache.cache.manager import Allocation
from kvcache.engine import Engine
from kvcache.engine.sequence import Sequence
from kvcache.kernels.dispatch import pack_blocks
from kvcache.tiers import Hierarchy, IcmsTier, LayoutFingerprint, RedisBackend, Seal

POD = "pod"


class PodTieredEngine(Engine):
    last_tier_errors = 0
    _pending: list[tuple[list[bytes], torch.Tensor]] | None = None

    @staticmethod
    def pod_tier(
        redis_url: str, capacity_blocks: int, worker_index: int = 0, tier_secret: bytes | None = None
    ) -> Any:
        """``EngineConfig.tiers``: builds the hierarchy once the engine knows its block layout.
        ``tier_secret`` keys the blocks' MAC (``tiers.seal``): Redis cannot plant a block."""

        def build(layout: LayoutFingerprint) -> Hierarchy:
            seal = Seal.keyed(tier_secret) if tier_secret is not None else None
            tier = IcmsTier(
                RedisBackend(redis_url, capacity_blocks),
                worker_id=worker_index,
                write_behind_blocks=64,
                seal=seal,
            )
            return Hierarchy(layout, [tier])

        return build

    def _errors(self) -> int:
        return sum(s.errors for s in self.tiers.stats().tiers.values()) if self.tiers is not None else 0

    def _load_prefix(self, seq: Sequence, alloc: Allocation) -> int:
        errors_before = self._errors()
        loaded = super()._load_prefix(seq, alloc)
        self.last_tier_errors = self._errors() - errors_before
        return loaded

    def _prefill_done(self, seq: Sequence) -> None:
        prompt = seq.prompt
        if self.tiers is None or prompt is None or self.tiers_gated(prompt) or seq.num_preemptions:
            return
        bs = self.block_size
        start = max(seq.num_cached_tokens, 0) // bs
        end = len(prompt.keys)  # full prompt blocks, all written to the pool by now
        if end > start:
            table = self.manager.block_ids(seq.request_id)
            ids = torch.tensor(table[start:end], dtype=torch.long, device=self.device)
            if self._pending is None:
                self._pending = []
            self._pending.append((list(prompt.keys[start:end]), pack_blocks(self.pool, ids)))

    def write_through(self) -> None:
        """Store the newly computed prompt blocks of the requests prefilled since the last call in
        the pod tier and flush, so other workers find them. Called after the request, off its time
        to first token."""
        pending, self._pending = self._pending, None
        if pending is None or self.tiers is None:
            return
        errors_before = self._errors()
        for keys, packed in pending:
            self.tiers.store(keys, packed)
        self.tiers.flush()
        self.last_tier_errors += self._errors() - errors_before
