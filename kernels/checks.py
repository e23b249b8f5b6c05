"""Argument checks shared by every block-copy backend, so all of them reject the same inputs.

Each check raises :class:`kvcache.errors.KernelError` naming the argument, what it got, what was
expected and how to fix it, before anything is written. The checks also normalise block ids: a
caller may pass them on the CPU or on the pool's device, as int32 or int64; the backends always
receive int64 ids on the pool's device.

What is checked: the pool is a contiguous 6-D tensor ``[L, 2, num_blocks, block_size, kv_heads,
head_dim]`` of a supported float dtype; the dense caches and block-major buffers have the shapes the
pool implies and live on its device; ids are 1-D integer tensors inside ``[0, num_blocks)``, without
repeats when they are written to. Checking ids held on a GPU reads them back once (one
synchronisation per call): pass CPU ids (the block manager hands out Python ints) to avoid it.

Not here: the copies themselves (``reference``, ``triton_kernels``) and the choice between them
(``dispatch``).
"""

from __future__ import annotations

import torch

from kvcache.errors import KernelError

__all__ = [
    "SUPPORTED_DTYPES",
    "check_block_ids",
    "check_block_major",
    "check_copy",
    "check_dense_kv",
    "check_pool",
    "check_pool_pair",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ID_DTYPES = (torch.int32, torch.int64)


def check_pool(pool: object, name: str = "pool") -> torch.Tensor:
    """``pool`` itself once it is a contiguous ``[L, 2, num_blocks, block_size, kv_heads, head_dim]``."""
    if not isinstance(pool, torch.Tensor):
        raise KernelError(f"{name} must be a torch.Tensor, got {type(pool).__name__}")
    if pool.dim() != 6 or pool.shape[1] != 2:
        raise KernelError(
            f"{name} has shape {tuple(pool.shape)}; expected 6 dims "
            "[num_layers, 2, num_blocks, block_size, kv_heads, head_dim] with 2 = (K, V)"
        )
    if pool.dtype not in SUPPORTED_DTYPES:
        raise KernelError(f"{name} has dtype {pool.dtype}; supported: {_names(SUPPORTED_DTYPES)}")
    if not pool.is_contiguous():
        raise KernelError(
            f"{name} is not contiguous (strides {pool.stride()}); allocate the pool with "
            "torch.empty/zeros of its full shape and index blocks through block ids, not slices"
        )
    return pool


def check_pool_pair(src_pool: object, dst_pool: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Two pools whose blocks have the same layout and dtype (their block counts may differ)."""
    src = check_pool(src_pool, "src_pool")
    dst = check_pool(dst_pool, "dst_pool")
    src_layout = (src.shape[0], *src.shape[3:])
    dst_layout = (dst.shape[0], *dst.shape[3:])
    if src_layout != dst_layout:
        raise KernelError(
            f"src_pool blocks are (num_layers, block_size, kv_heads, head_dim) = {src_layout} but "
            f"dst_pool blocks are {dst_layout}; copy only between pools of one model layout"
        )
    if src.dtype != dst.dtype:
        raise KernelError(
            f"src_pool has dtype {src.dtype} but dst_pool has {dst.dtype}; a tier copy moves bytes "
            "unchanged, so both pools must hold the same dtype"
        )
    return src, dst


def check_block_ids(
    block_ids: object, pool: torch.Tensor, *, name: str = "block_ids", unique: bool = False
) -> torch.Tensor:
    """``block_ids`` as int64 on ``pool``'s device, once every id is a valid block of ``pool``.

    ``unique`` forbids repeats: a write to the same block twice in one call has no defined winner.
    """
    if not isinstance(block_ids, torch.Tensor):
        raise KernelError(
            f"{name} must be a 1-D torch.Tensor of int32/int64, got {type(block_ids).__name__}; "
            "wrap a list with torch.tensor(ids, dtype=torch.int64)"
        )
    if block_ids.dim() != 1:
        raise KernelError(f"{name} must be 1-D, got shape {tuple(block_ids.shape)}")
    if block_ids.dtype not in _ID_DTYPES:
        raise KernelError(f"{name} has dtype {block_ids.dtype}; expected int32 or int64")
    if block_ids.device.type != "cpu" and block_ids.device != pool.device:
        raise KernelError(
            f"{name} is on {block_ids.device} but the pool is on {pool.device}; "
            "pass the ids on the CPU or on the pool's device"
        )
    num_blocks = pool.shape[2]
    if block_ids.numel():
        host = block_ids if block_ids.device.type == "cpu" else block_ids.cpu()
        low, high = (int(v) for v in torch.aminmax(host))
        if low < 0 or high >= num_blocks:
            bad = low if low < 0 else high
            raise KernelError(
                f"{name} holds block id {bad}, outside the pool's {num_blocks} blocks [0, {num_blocks})"
            )
        if unique and torch.unique(host).numel() != host.numel():
            raise KernelError(f"{name} repeats a block id; each block may be written once per call")
    return block_ids.to(device=pool.device, dtype=torch.int64)


def check_copy(
    src_pool: object, src_ids: object, dst_pool: object, dst_ids: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The arguments of a pool-to-pool copy, ids normalised onto their own pool's device."""
    src, dst = check_pool_pair(src_pool, dst_pool)
    src_checked = check_block_ids(src_ids, src, name="src_ids")
    dst_checked = check_block_ids(dst_ids, dst, name="dst_ids", unique=True)
    if src_checked.numel() != dst_checked.numel():
        raise KernelError(
            f"src_ids has {src_checked.numel()} ids but dst_ids has {dst_checked.numel()}; "
            "pass one destination block per source block"
        )
    return src, src_checked, dst, dst_checked


def check_dense_kv(kv: object, pool: torch.Tensor, num_ids: int, name: str = "kv") -> torch.Tensor:
    """``kv`` once it is the dense cache ``[L, 2, kv_heads, num_ids * block_size, head_dim]`` of ``pool``."""
    num_layers, _, _, block_size, kv_heads, head_dim = pool.shape
    expected = (num_layers, 2, kv_heads, num_ids * block_size, head_dim)
    return _check_operand(kv, pool, expected, name, "[num_layers, 2, kv_heads, n * block_size, head_dim]")


def check_block_major(packed: object, pool: torch.Tensor, num_ids: int, name: str = "packed") -> torch.Tensor:
    """``packed`` once it is the block-major buffer ``[n, L, 2, block_size, kv_heads, head_dim]``."""
    num_layers, _, _, block_size, kv_heads, head_dim = pool.shape
    expected = (num_ids, num_layers, 2, block_size, kv_heads, head_dim)
    return _check_operand(packed, pool, expected, name, "[n, num_layers, 2, block_size, kv_heads, head_dim]")


def _check_operand(
    tensor: object, pool: torch.Tensor, expected: tuple[int, ...], name: str, layout: str
) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise KernelError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != expected:
        raise KernelError(
            f"{name} has shape {tuple(tensor.shape)}; the pool {tuple(pool.shape)} and the number of "
            f"block ids imply {expected} = {layout}"
        )
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise KernelError(f"{name} has dtype {tensor.dtype}; supported: {_names(SUPPORTED_DTYPES)}")
    if tensor.device != pool.device:
        raise KernelError(
            f"{name} is on {tensor.device} but the pool is on {pool.device}; move it with .to(pool.device)"
        )
    return tensor


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)
