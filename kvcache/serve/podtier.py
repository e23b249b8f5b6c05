"""The pod tier for served engines: every worker reads and writes one Redis-backed ICMS tier.

``PodTieredEngine`` is the HF engine plus a ``kvcache.tiers.Hierarchy`` whose only tier is an
``IcmsTier`` over ``RedisBackend``:

- before prefill, the blocks after the device hit are looked up in the pod tier and the leading
  ones it holds are loaded into their (already allocated) pool slots, so prefill computes only
  the rest; at least one prompt token is always computed, for its logits;
- after prefill the prompt's newly computed full blocks are packed (a local copy), and
  ``write_through`` (which the worker calls once the request is answered, so Redis writes stay
  off its time to first token) stores and flushes them, so another worker's next request with
  the same prefix finds them.

Keys are the block manager's (scope-rooted, so tenants never share tier entries). Blocks of a
share group under k-anonymity (k > 1) never come from the pod tier: the tier does not know how
many tenants wrote a block, and a hit there must not reveal what one tenant sent. When Redis is
unreachable the tier answers misses and counts errors; requests never fail because of it.

Per request (the engine is single-threaded) ``last_tier_tokens`` is how many prompt tokens
came from the pod tier and ``last_tier_errors`` how many backend errors that request met.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from kvcache.engine import Engine
from kvcache.kernels import pack_blocks, unpack_blocks
from kvcache.manager import Allocation
from kvcache.tiers import Hierarchy, IcmsTier, LayoutFingerprint, RedisBackend

POD = "pod"


class PodTieredEngine(Engine):
    hierarchy: Hierarchy | None = None
    last_tier_tokens = 0
    last_tier_errors = 0
    _pending: tuple[list[bytes], torch.Tensor] | None = None

    def attach_pod_tier(self, redis_url: str, capacity_blocks: int, worker_index: int = 0) -> None:
        backend = RedisBackend(redis_url, capacity_blocks)
        tier = IcmsTier(backend, worker_id=worker_index, write_behind_blocks=64)
        self.hierarchy = Hierarchy(LayoutFingerprint.of_pool(self.model_id, self.pool), [tier])

    def _errors(self) -> int:
        assert self.hierarchy is not None
        return sum(s.errors for s in self.hierarchy.stats().tiers.values())

    def _keys(self, block_ids: Sequence[int]) -> list[bytes]:
        """Keys of the leading blocks that this request keyed and may take from a shared store."""
        manager = self.manager
        gated = manager.config.k_anonymity > 1
        keys: list[bytes] = []
        for block_id in block_ids:
            block = manager.pool.blocks[block_id]
            if block.key is None or (gated and block.scope.startswith("group:")):
                break
            keys.append(block.key)
        return keys

    def _prefill(
        self, tokens: Sequence[int], alloc: Allocation, hash_s: float, lookup_s: float
    ) -> tuple[torch.Tensor, Any, Any]:
        hierarchy = self.hierarchy
        self.last_tier_tokens = 0
        if hierarchy is None:
            return super()._prefill(tokens, alloc, hash_s, lookup_s)
        errors_before = self._errors()
        bs = self.block_size
        num_hit = alloc.num_cached_tokens // bs
        last = (len(tokens) - 1) // bs  # blocks before it may come from the tier; one token is computed
        keys = self._keys(alloc.block_ids[num_hit:last])
        if keys and hierarchy.lookup_prefix(keys):
            packed = hierarchy.load(keys, context_tokens=alloc.num_cached_tokens)
            loaded = int(packed.shape[0])
            if loaded:
                ids = torch.tensor(alloc.block_ids[num_hit : num_hit + loaded], dtype=torch.long,
                                   device=self.device)  # fmt: skip
                unpack_blocks(self.pool, ids, packed.to(device=self.device, dtype=self.dtype))
                alloc = dataclasses.replace(alloc, num_cached_tokens=(num_hit + loaded) * bs)
                self.last_tier_tokens = loaded * bs
        logits, cache, timings = super()._prefill(tokens, alloc, hash_s, lookup_s)
        start, end = alloc.num_cached_tokens // bs, len(tokens) // bs
        computed = self._keys(alloc.block_ids[start:end])
        if computed:  # packed now (a local copy), written by ``write_through`` after the request
            ids = torch.tensor(alloc.block_ids[start : start + len(computed)], dtype=torch.long,
                               device=self.device)  # fmt: skip
            self._pending = (computed, pack_blocks(self.pool, ids))
        self.last_tier_errors = self._errors() - errors_before
        return logits, cache, timings

    def write_through(self) -> None:
        """Store the last request's newly computed prompt blocks in the pod tier and flush, so
        other workers find them. Called after the request, off its time to first token."""
        pending, self._pending = self._pending, None
        if pending is None or self.hierarchy is None:
            return
        errors_before = self._errors()
        self.hierarchy.store(*pending)
        self.hierarchy.flush()
        self.last_tier_errors += self._errors() - errors_before
