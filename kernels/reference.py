"""Pure-torch block copies: the specification every faster kernel is checked against.

The paged pool of one model holds every layer's K and V:

    pool: [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]   (index 0 = K, 1 = V)

Block ids index dimension 2. :func:`pack_blocks` / :func:`unpack_blocks` move the blocks of one
request to and from a block-major buffer ``[n, num_layers, 2, block_size, kv_heads, head_dim]`` in
which each block is one contiguous run of bytes, the unit a spill tier stores, in one call (one
``index_select``/``index_copy_`` over the whole pool), never one copy per block.

These functions trust their arguments; :mod:`kvcache.kernels.dispatch` checks them first. Not here:
attention over the pool (``paged``).
"""

from __future__ import annotations

import torch

__all__ = ["pack_blocks", "unpack_blocks"]


def pack_blocks(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks ``block_ids`` as a block-major buffer ``[n, L, 2, block_size, kv_heads, head_dim]``."""
    # One pass: selecting along the leading dim of the block-major view writes a contiguous result,
    # where index_select(2, ...) followed by .contiguous() copies twice (~9x slower on CPU for bf16).
    return pool.permute(2, 0, 1, 3, 4, 5).index_select(0, block_ids).contiguous()  # no-op: a guarantee


def unpack_blocks(pool: torch.Tensor, block_ids: torch.Tensor, packed: torch.Tensor) -> None:
    """Write a block-major buffer ``[n, L, 2, block_size, kv_heads, head_dim]`` into ``block_ids``."""
    pool.index_copy_(2, block_ids, packed.permute(1, 2, 0, 3, 4, 5).to(pool.dtype))
