"""Argument checks of the kernels, shared by every backend, so all of them reject the same inputs.

Each check raises :class:`kvcache.errors.KernelError` naming the argument, what it got, what was
expected and how to fix it, before anything is written. The checks also normalise block ids: a
caller may pass them on the CPU or on the pool's device, as int32 or int64; the backends always
receive int64 ids on the pool's device.

What is checked: the pool is a contiguous 6-D tensor ``[L, 2, num_blocks, block_size, kv_heads,
head_dim]`` of a supported float dtype; block-major buffers have the shape the pool implies and live
on its device; ids are 1-D integer tensors inside ``[0, num_blocks)``, without repeats when they are
written to; the Triton decode-attention launch gets queries, block tables and lengths that fit the
pool (``check_decode_args``); a Triton kernel gets tensors on a CUDA device, or on the CPU when it
was built for Triton's interpreter (``check_triton_device``, ``interpreted``). Checking ids held on a
GPU reads them back once (one synchronisation per call): pass CPU ids (the block manager hands out
Python ints) to avoid it.

Not here: the copies themselves (``reference``, ``triton_kernels``), the choice between them
(``dispatch``), attention (``paged``, ``triton_attention``).
"""

from __future__ import annotations

import torch

from kvcache.errors import KernelError

__all__ = [
    "SUPPORTED_DTYPES",
    "check_block_ids",
    "check_block_major",
    "check_decode_args",
    "check_pool",
    "check_triton_device",
    "interpreted",
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


def check_block_major(packed: object, pool: torch.Tensor, num_ids: int, name: str = "packed") -> torch.Tensor:
    """``packed`` once it is the block-major buffer ``[n, L, 2, block_size, kv_heads, head_dim]``."""
    num_layers, _, _, block_size, kv_heads, head_dim = pool.shape
    expected = (num_ids, num_layers, 2, block_size, kv_heads, head_dim)
    return _check_operand(packed, pool, expected, name, "[n, num_layers, 2, block_size, kv_heads, head_dim]")


def check_decode_args(
    q: object, pool: object, layer: object, block_tables: object, seq_lens: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(q, pool, block_tables, seq_lens, max_len)`` checked; tables and lengths as int64 on the
    pool's device, ``max_len`` the longest sequence (0 for an empty batch)."""
    pool_t = check_pool(pool)
    num_layers, _, num_blocks, block_size, kv_heads, head_dim = pool_t.shape
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise KernelError(f"q must be a tensor [num_seqs, num_heads, head_dim], got {got}")
    num_seqs, num_heads, q_dim = q.shape
    if q_dim != head_dim or num_heads % kv_heads:
        raise KernelError(
            f"q has shape {tuple(q.shape)}; the pool has {kv_heads} KV heads of dim {head_dim}, so q needs "
            f"head_dim {head_dim} and a multiple of {kv_heads} heads"
        )
    if q.dtype not in SUPPORTED_DTYPES or q.device != pool_t.device:
        raise KernelError(f"q is {q.dtype} on {q.device}; expected a float tensor on {pool_t.device}")
    if not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise KernelError(f"layer={layer!r} is not a layer of the pool's {num_layers}")
    if not isinstance(block_tables, torch.Tensor) or block_tables.dim() != 2:
        raise KernelError("block_tables must be a tensor [num_seqs, max_blocks_per_seq] of block ids")
    if not isinstance(seq_lens, torch.Tensor) or tuple(seq_lens.shape) != (num_seqs,):
        raise KernelError(f"seq_lens must be a tensor of {num_seqs} lengths (one per row of q)")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise KernelError(f"{name} has dtype {t.dtype}; expected int32 or int64")
        if t.device.type != "cpu" and t.device != pool_t.device:
            raise KernelError(f"{name} is on {t.device}; pass it on the CPU or on {pool_t.device}")
    if block_tables.shape[0] != num_seqs:
        raise KernelError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")
    lens = seq_lens.cpu()
    capacity = block_tables.shape[1] * block_size
    if num_seqs and (int(lens.min()) < 1 or int(lens.max()) > capacity):
        raise KernelError(
            f"seq_lens must lie in [1, {capacity}] (max_blocks_per_seq * block_size), got "
            f"{int(lens.min())}..{int(lens.max())}"
        )
    tables = block_tables.cpu()
    used = torch.arange(tables.shape[1])[None, :] < (lens[:, None] + block_size - 1) // block_size
    bad = used & ((tables < 0) | (tables >= num_blocks))
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0, 0])
        raise KernelError(
            f"block_tables row {row} lists a block outside the pool's {num_blocks} blocks "
            f"[0, {num_blocks}) within its first {int(lens[row])} tokens"
        )
    device = pool_t.device
    max_len = int(lens.max()) if num_seqs else 0
    return q, pool_t, block_tables.to(device, torch.int64), seq_lens.to(device, torch.int64), max_len


def interpreted(kernel: object) -> bool:
    """Whether ``kernel`` (a ``triton.jit`` function) was built for Triton's interpreter, as it is
    when ``TRITON_INTERPRET=1`` is set while its module is imported: it then takes CPU tensors."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_triton_device(tensor: torch.Tensor, kernel: object, module: str, name: str = "pool") -> None:
    """``tensor`` where ``kernel``, of the Triton module ``module``, can read it: on a CUDA device,
    or on the CPU when the kernel was built for the interpreter."""
    if tensor.device.type == "cuda" or (tensor.device.type == "cpu" and interpreted(kernel)):
        return
    raise KernelError(
        f"the Triton kernels of {module} need {name} on a CUDA device, got {tensor.device}; use the "
        f"reference there, or set TRITON_INTERPRET=1 before importing {module} to run them on CPU "
        "tensors in the interpreter"
    )


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
