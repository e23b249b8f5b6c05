"""G1: the device pool as a tier, a paged tensor in the kernels' pool layout.

    pool: [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]

The same layout ``kvcache.kernels`` gathers from and scatters into, so an engine's own pool can
be wrapped as-is. On CUDA when present, else on CPU (the default, and what CI runs). Batched
loads and stores are one ``pack_blocks``/``unpack_blocks`` call over all slots.

Not here: which blocks a request uses (the block manager), demotion to slower tiers (the
hierarchy sets ``on_evict``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcache.errors import TierError
from kvcache.kernels.dispatch import pack_blocks, unpack_blocks
from kvcache.tiers.base import LayoutFingerprint, TierKey
from kvcache.tiers.slots import SlabTier


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class DeviceTier(SlabTier):
    name = "G1"

    def __init__(
        self,
        layout: LayoutFingerprint,
        capacity_blocks: int,
        device: torch.device | str | None = None,
        pool: torch.Tensor | None = None,
    ) -> None:
        super().__init__(layout, capacity_blocks)
        device = torch.device(device) if device is not None else default_device()
        shape = (layout.num_layers, 2, capacity_blocks, layout.block_size, layout.kv_heads, layout.head_dim)
        if pool is None:
            pool = torch.zeros(shape, dtype=layout.torch_dtype, device=device)
        elif tuple(pool.shape) != shape or pool.dtype != layout.torch_dtype:
            raise TierError(f"pool {tuple(pool.shape)} {pool.dtype} is not {shape} {layout.dtype}")
        self.pool = pool  # [L, 2, capacity_blocks, block_size, kv_heads, head_dim]

    def _slot_view(self, slot: int) -> torch.Tensor:
        return self.pool[:, :, slot]

    def load_many(
        self, keys: Sequence[TierKey], outs: Sequence[torch.Tensor | None] | None = None
    ) -> list[torch.Tensor | None]:
        if outs is not None:
            return super().load_many(keys, outs)
        slots = [self.table.get(k.key) if self._mine(k) else None for k in keys]
        held = [s for s in slots if s is not None]
        if not held:
            self._stats.misses += len(keys)
            return [None] * len(keys)
        ids = torch.tensor(held, dtype=torch.long, device=self.pool.device)
        packed = pack_blocks(self.pool, ids)  # [n, L, 2, block_size, kv_heads, head_dim]
        out: list[torch.Tensor | None] = []
        it = iter(packed)
        for slot in slots:
            out.append(None if slot is None else next(it))
        s = self._stats
        s.hits += len(held)
        s.misses += len(keys) - len(held)
        s.blocks_out += len(held)
        s.bytes_out += len(held) * self.layout.block_nbytes
        return out

    def store_packed(self, keys: Sequence[TierKey], packed: torch.Tensor) -> None:
        """Store ``packed`` ``[n, L, 2, block_size, kv_heads, head_dim]`` with one scatter when
        every key is new and there is room; otherwise block by block."""
        fresh = len({k.key for k in keys}) == len(keys) and not any(self.contains(k) for k in keys)
        if not fresh or len(keys) > len(self.table.free) or any(k.layout != self.layout for k in keys):
            self.store_many(keys, list(packed))
            return
        slots = [self.table.put(k.key) for k in keys]
        ids = torch.tensor(slots, dtype=torch.long, device=self.pool.device)
        unpack_blocks(self.pool, ids, packed.to(self.pool.device))
        self._stats.blocks_in += len(keys)
        self._stats.bytes_in += len(keys) * self.layout.block_nbytes
