"""Pure-torch block copies: the specification every faster kernel is checked against.

The paged pool of one model holds every layer's K and V:

    pool: [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]   (index 0 = K, 1 = V)

Block ids index dimension 2. Each function moves all the blocks of one request in one call (one
``index_select``/``index_copy_`` over the whole pool), never one copy per block.

- :func:`gather_kv` builds the contiguous cache a transformers model consumes,
  ``[num_layers, 2, kv_heads, n * block_size, head_dim]`` (layer ``l``'s keys are ``out[l, 0]``).
- :func:`scatter_kv` is its inverse: it writes such a cache back into the pool's blocks.
- :func:`pack_blocks` / :func:`unpack_blocks` move blocks to and from a block-major buffer
  ``[n, num_layers, 2, block_size, kv_heads, head_dim]`` in which each block is one contiguous run of
  bytes, the unit a spill tier stores.
- :func:`copy_blocks` copies blocks from one pool to another of the same layout (two tiers, possibly
  on two devices) with one gather on the source and one write on the destination.

These functions trust their arguments; :mod:`kvcache.kernels.dispatch` checks them first.
"""

from __future__ import annotations

import torch

__all__ = ["copy_blocks", "gather_kv", "pack_blocks", "scatter_kv", "unpack_blocks"]


def gather_kv(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks ``block_ids`` of ``pool`` as one cache ``[L, 2, kv_heads, n * block_size, head_dim]``."""
    num_layers, two, _, block_size, kv_heads, head_dim = pool.shape
    n = block_ids.numel()
    picked = pool.index_select(2, block_ids)  # [L, 2, n, block_size, H, D]
    return picked.permute(0, 1, 4, 2, 3, 5).reshape(num_layers, two, kv_heads, n * block_size, head_dim)


def scatter_kv(pool: torch.Tensor, block_ids: torch.Tensor, kv: torch.Tensor) -> None:
    """Write ``kv`` ``[L, 2, kv_heads, n * block_size, head_dim]`` into blocks ``block_ids`` of ``pool``."""
    num_layers, two, _, block_size, kv_heads, head_dim = pool.shape
    n = block_ids.numel()
    blocks = kv.reshape(num_layers, two, kv_heads, n, block_size, head_dim).permute(0, 1, 3, 4, 2, 5)
    pool.index_copy_(2, block_ids, blocks.to(pool.dtype))


def pack_blocks(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks ``block_ids`` as a block-major buffer ``[n, L, 2, block_size, kv_heads, head_dim]``."""
    return pool.index_select(2, block_ids).permute(2, 0, 1, 3, 4, 5).contiguous()


def unpack_blocks(pool: torch.Tensor, block_ids: torch.Tensor, packed: torch.Tensor) -> None:
    """Write a block-major buffer ``[n, L, 2, block_size, kv_heads, head_dim]`` into ``block_ids``."""
    pool.index_copy_(2, block_ids, packed.permute(1, 2, 0, 3, 4, 5).to(pool.dtype))


def copy_blocks(
    src_pool: torch.Tensor, src_ids: torch.Tensor, dst_pool: torch.Tensor, dst_ids: torch.Tensor
) -> None:
    """Copy blocks ``src_ids`` of ``src_pool`` into blocks ``dst_ids`` of ``dst_pool`` (same layout)."""
    picked = src_pool.index_select(2, src_ids)  # [L, 2, n, block_size, H, D] on the source device
    dst_pool.index_copy_(2, dst_ids, picked.to(dst_pool.device))
