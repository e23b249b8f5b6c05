"""Triton kernels for the block copies, behind thin launchers that check every argument first.

Every operation is one launch of one kernel, :func:`_block_copy_kernel`: a program copies one block
(``block_size * kv_heads * head_dim`` elements) of one layer's K or V from a source to a destination.
Both sides are described as 6-D strided views ordered ``(layer, kv, block, token, head, dim)``; a
side is either *indexed* (its block comes from an id array: the pool) or *dense* (block ``i`` of the
request: the block-major buffer). The two operations are only different stride sets over that one
kernel:

    pack_blocks    pool[l, k, ids[i], t, h, d]   -> packed[i, l, k, t, h, d]
    unpack_blocks  packed[i, l, k, t, h, d]      -> pool[l, k, ids[i], t, h, d]

The launch grid is ``(n, num_layers * 2)``: all blocks of a request move in one launch, never one
copy per block. Offsets of the pool side are computed in int64 (a pool can exceed 2**31 elements).
The kernel moves elements unchanged; a source of another dtype than the pool is first converted
by torch (``.to(pool.dtype)``, round to nearest even, as the reference does), because the
interpreter's float32 -> bfloat16 conversion rounds differently.

The kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before this module is imported), which is how CI checks them against the reference. Callers use
:mod:`kvcache.kernels.dispatch`, not this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcache.kernels import checks

__all__ = ["pack_blocks", "unpack_blocks"]

# Elements one program moves per loop step; a 16 x 8 x 128 block takes 4 steps.
_MAX_TILE = 4096


@triton.jit
def _block_copy_kernel(
    src_ptr,
    dst_ptr,
    src_ids_ptr,
    dst_ids_ptr,
    src_s_layer,
    src_s_kv,
    src_s_block,
    src_s_tok,
    src_s_head,
    src_s_dim,
    dst_s_layer,
    dst_s_kv,
    dst_s_block,
    dst_s_tok,
    dst_s_head,
    dst_s_dim,
    SRC_INDEXED: tl.constexpr,
    DST_INDEXED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TILE: tl.constexpr,
):
    i = tl.program_id(0)  # which block of the request
    lk = tl.program_id(1)  # layer * 2 + (0 for K, 1 for V)
    layer = (lk // 2).to(tl.int64)
    kv = (lk % 2).to(tl.int64)
    if SRC_INDEXED:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        src_block = tl.load(src_ids_ptr + i).to(tl.int64)
    else:
        src_block = i.to(tl.int64)
    if DST_INDEXED:  # noqa: SIM108
        dst_block = tl.load(dst_ids_ptr + i).to(tl.int64)
    else:
        dst_block = i.to(tl.int64)
    src_base = src_ptr + layer * src_s_layer + kv * src_s_kv + src_block * src_s_block
    dst_base = dst_ptr + layer * dst_s_layer + kv * dst_s_kv + dst_block * dst_s_block
    num_elements = BLOCK_SIZE * KV_HEADS * HEAD_DIM
    for start in range(0, num_elements, TILE):
        offs = start + tl.arange(0, TILE)
        mask = offs < num_elements
        tok = offs // (KV_HEADS * HEAD_DIM)
        head = (offs // HEAD_DIM) % KV_HEADS
        dim = offs % HEAD_DIM
        values = tl.load(src_base + tok * src_s_tok + head * src_s_head + dim * src_s_dim, mask=mask)
        tl.store(dst_base + tok * dst_s_tok + head * dst_s_head + dim * dst_s_dim, values, mask=mask)


def _block_major_view(packed: torch.Tensor) -> torch.Tensor:
    """``[n, L, 2, bs, H, D]`` seen as ``[L, 2, n, bs, H, D]``."""
    return packed.permute(1, 2, 0, 3, 4, 5)


def _launch(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_ids: torch.Tensor | None,
    dst_ids: torch.Tensor | None,
    num_ids: int,
) -> None:
    """Copy ``num_ids`` blocks between two ``[L, 2, blocks, bs, H, D]`` views (ids: indexed sides)."""
    num_layers, _, _, block_size, kv_heads, head_dim = src.shape
    if num_ids == 0:
        return
    num_elements = block_size * kv_heads * head_dim
    tile = min(triton.next_power_of_2(num_elements), _MAX_TILE)
    # An unused id pointer still needs a tensor on the device; the kernel never reads it.
    placeholder = src_ids if src_ids is not None else dst_ids
    assert placeholder is not None, "at least one side of a block copy is indexed by block ids"
    _block_copy_kernel[(num_ids, num_layers * 2)](
        src,
        dst,
        src_ids if src_ids is not None else placeholder,
        dst_ids if dst_ids is not None else placeholder,
        *src.stride(),
        *dst.stride(),
        SRC_INDEXED=src_ids is not None,
        DST_INDEXED=dst_ids is not None,
        BLOCK_SIZE=block_size,
        KV_HEADS=kv_heads,
        HEAD_DIM=head_dim,
        TILE=tile,
    )


def pack_blocks(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks ``block_ids`` as a block-major buffer ``[n, L, 2, block_size, kv_heads, head_dim]``."""
    checks.check_pool(pool)
    checks.check_triton_device(pool, _block_copy_kernel, __name__)
    ids = checks.check_block_ids(block_ids, pool)
    num_layers, _, _, block_size, kv_heads, head_dim = pool.shape
    out = torch.empty(
        (ids.numel(), num_layers, 2, block_size, kv_heads, head_dim), dtype=pool.dtype, device=pool.device
    )
    _launch(pool, _block_major_view(out), ids, None, ids.numel())
    return out


def unpack_blocks(pool: torch.Tensor, block_ids: torch.Tensor, packed: torch.Tensor) -> None:
    """Write a block-major buffer ``[n, L, 2, block_size, kv_heads, head_dim]`` into ``block_ids``."""
    checks.check_pool(pool)
    checks.check_triton_device(pool, _block_copy_kernel, __name__)
    ids = checks.check_block_ids(block_ids, pool, unique=True)
    packed = checks.check_block_major(packed, pool, ids.numel()).to(pool.dtype)
    _launch(_block_major_view(packed), pool, None, ids, ids.numel())
