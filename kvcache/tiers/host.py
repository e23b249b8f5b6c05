"""G2: host memory, one slab of block-major slots ``[capacity, L, 2, block_size, kv_heads, head_dim]``.

Each block is one contiguous run of bytes, so a store or load is one copy. When CUDA is present
the slab is pinned and copies to or from device tensors run on a separate CUDA stream, ordered
against the caller's stream with ``wait_stream`` instead of a host synchronization, so they
overlap with compute. Without CUDA it is plain memory and plain copies.

Not here: demotion to disk when the slab is full (the hierarchy sets ``on_evict``).
"""

from __future__ import annotations

import torch

from kvcache.tiers.base import LayoutFingerprint
from kvcache.tiers.slots import SlabTier


class HostTier(SlabTier):
    name = "G2"

    def __init__(self, layout: LayoutFingerprint, capacity_blocks: int, pin: bool | None = None) -> None:
        super().__init__(layout, capacity_blocks)
        cuda = torch.cuda.is_available()
        pin = cuda if pin is None else pin
        # [capacity, L, 2, block_size, kv_heads, head_dim]
        self.slab = torch.empty(
            (capacity_blocks, *layout.block_shape), dtype=layout.torch_dtype, pin_memory=pin
        )
        self.stream = torch.cuda.Stream() if cuda else None  # type: ignore[no-untyped-call]

    def _slot_view(self, slot: int) -> torch.Tensor:
        if self.stream is not None:
            self.stream.synchronize()  # the host is about to read or write the slot's bytes
        return self.slab[slot]

    def _write(self, slot: int, block: torch.Tensor) -> None:
        stream = self.stream
        if stream is None or not block.is_cuda:
            self._slot_view(slot).copy_(block)
            return
        # The copy must see the compute that produced ``block``, and the caller's stream must
        # not overwrite ``block`` (a reused device slot) before the copy has read it.
        current = torch.cuda.current_stream(block.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            self.slab[slot].copy_(block, non_blocking=True)
        current.wait_stream(stream)

    def _read(self, slot: int, out: torch.Tensor | None) -> torch.Tensor:
        stream = self.stream
        if stream is None or out is None or not out.is_cuda:
            return super()._read(slot, out)
        self.layout.check_block(out)
        current = torch.cuda.current_stream(out.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            out.copy_(self.slab[slot], non_blocking=True)
        current.wait_stream(stream)  # compute that reads ``out`` waits for the copy, the host does not
        return out

    def synchronize(self) -> None:
        """Wait for every copy issued on the side stream (before the host reads the slab)."""
        if self.stream is not None:
            self.stream.synchronize()
