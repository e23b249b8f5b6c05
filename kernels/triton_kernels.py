"""Triton kernels for the block copies, behind thin launchers that check every argument first.

Every operation is one launch of one kernel, :func:`_block_copy_kernel`: a program copies one block
(``block_size * kv_heads * head_dim`` elements) of one layer's K or V from a source to a destination.
Both sides are described as 6-D strided views ordered ``(layer, kv, block, token, head, dim)``; a
side is either *indexed* (its block comes from an id array: the pool) or *dense* (block ``i`` of the
request: the contiguous cache or the block-major buffer). The five operations are only different
stride sets over that one kernel:

    gather_kv      pool[l, k, ids[i], t, h, d]   -> out[l, k, h, i * block_size + t, d]
    scatter_kv     kv[l, k, h, i * block_size + t, d] -> pool[l, k, ids[i], t, h, d]
    pack_blocks    pool[l, k, ids[i], t, h, d]   -> packed[i, l, k, t, h, d]
    unpack_blocks  packed[i, l, k, t, h, d]      -> pool[l, k, ids[i], t, h, d]
    copy_blocks    src[l, k, src_ids[i], t, h, d] -> dst[l, k, dst_ids[i], t, h, d]

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

from kvcache.errors import KernelError
from kvcache.kernels import checks

__all__ = ["copy_blocks", "gather_kv", "interpreted", "pack_blocks", "scatter_kv", "unpack_blocks"]

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


def interpreted() -> bool:
    """Whether this module's kernels were built for the Triton interpreter (they then take CPU tensors)."""
    return type(_block_copy_kernel).__name__ == "InterpretedFunction"


def _check_device(pool: torch.Tensor, name: str = "pool") -> None:
    if pool.device.type == "cuda":
        return
    if pool.device.type == "cpu" and interpreted():
        return
    raise KernelError(
        f"the Triton kernels need {name} on a CUDA device, got {pool.device}; use the reference "
        "backend there, or set TRITON_INTERPRET=1 before importing kvcache.kernels.triton_kernels "
        "to run them on CPU tensors in the interpreter"
    )


def _dense_cache_view(kv: torch.Tensor, num_ids: int, block_size: int) -> torch.Tensor:
    """``[L, 2, H, n * bs, D]`` seen as ``[L, 2, n, bs, H, D]`` (a view: only strides change)."""
    num_layers, two, kv_heads, _, head_dim = kv.shape
    split = kv.view(num_layers, two, kv_heads, num_ids, block_size, head_dim)
    return split.permute(0, 1, 3, 4, 2, 5)


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


def gather_kv(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks ``block_ids`` of ``pool`` as one cache ``[L, 2, kv_heads, n * block_size, head_dim]``."""
    checks.check_pool(pool)
    _check_device(pool)
    ids = checks.check_block_ids(block_ids, pool)
    num_layers, _, _, block_size, kv_heads, head_dim = pool.shape
    n = ids.numel()
    out = torch.empty(
        (num_layers, 2, kv_heads, n * block_size, head_dim), dtype=pool.dtype, device=pool.device
    )
    _launch(pool, _dense_cache_view(out, n, block_size), ids, None, n)
    return out


def scatter_kv(pool: torch.Tensor, block_ids: torch.Tensor, kv: torch.Tensor) -> None:
    """Write ``kv`` ``[L, 2, kv_heads, n * block_size, head_dim]`` into blocks ``block_ids`` of ``pool``."""
    checks.check_pool(pool)
    _check_device(pool)
    ids = checks.check_block_ids(block_ids, pool, unique=True)
    kv = checks.check_dense_kv(kv, pool, ids.numel()).to(pool.dtype)
    _launch(_dense_cache_view(kv, ids.numel(), pool.shape[3]), pool, None, ids, ids.numel())


def pack_blocks(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks ``block_ids`` as a block-major buffer ``[n, L, 2, block_size, kv_heads, head_dim]``."""
    checks.check_pool(pool)
    _check_device(pool)
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
    _check_device(pool)
    ids = checks.check_block_ids(block_ids, pool, unique=True)
    packed = checks.check_block_major(packed, pool, ids.numel()).to(pool.dtype)
    _launch(_block_major_view(packed), pool, None, ids, ids.numel())


def copy_blocks(
    src_pool: torch.Tensor, src_ids: torch.Tensor, dst_pool: torch.Tensor, dst_ids: torch.Tensor
) -> None:
    """Copy blocks ``src_ids`` of ``src_pool`` into blocks ``dst_ids`` of ``dst_pool`` (one device)."""
    src, dst = checks.check_pool_pair(src_pool, dst_pool)
    _check_device(src, "src_pool")
    _check_device(dst, "dst_pool")
    if src.device != dst.device:
        raise KernelError(
            f"src_pool is on {src.device} and dst_pool on {dst.device}; the Triton copy works within one "
            "device: use kvcache.kernels.copy_blocks, which moves blocks across devices"
        )
    src, s_ids, dst, d_ids = checks.check_copy(src, src_ids, dst, dst_ids)
    _launch(src, dst, s_ids, d_ids, s_ids.numel())
