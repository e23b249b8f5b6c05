"""The one place that picks an implementation of the block copies for a tensor's device.

Callers import from here (or from ``kvcache.kernels``), never from a backend module. Today every
device uses :mod:`kvcache.kernels.reference`; a faster backend registers here for the devices it
serves, and the choice is made per call from the pool's device, not at import time.
"""

from __future__ import annotations

import torch
from kvcache.kernels import reference

__all__ = ["gather_kv", "pack_blocks", "scatter_kv", "unpack_blocks"]


def gather_kv(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    return reference.gather_kv(pool, block_ids)


def scatter_kv(pool: torch.Tensor, block_ids: torch.Tensor, kv: torch.Tensor) -> None:
    reference.scatter_kv(pool, block_ids, kv)


def pack_blocks(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    return reference.pack_blocks(pool, block_ids)


def unpack_blocks(pool: torch.Tensor, block_ids: torch.Tensor, packed: torch.Tensor) -> None:
    reference.unpack_blocks(pool, block_ids, packed)
