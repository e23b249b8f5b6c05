"""Decode attention that reads K and V straight from the paged pool, without gathering them first.

One new query token per sequence attends to that sequence's cached tokens, which live in the blocks
its block table lists (in order), in one layer of the pool
``[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]``. Grouped-query attention is
supported: query head ``h`` reads KV head ``h // (num_heads // kv_heads)``, as transformers'
``repeat_kv`` does. Scores and softmax are computed in float32; the output has ``q``'s dtype.

- :func:`paged_decode_attention_reference` is the specification in plain torch (a gather, then
  softmax attention, one sequence at a time);
- :func:`paged_decode_attention` checks the arguments and dispatches like the block copies
  (:func:`kvcache.kernels.dispatch.select_backend`): the Triton kernel in
  :mod:`kvcache.kernels.triton_attention` on CUDA, the reference elsewhere.

Not here: prefill attention, masks other than the sequence length, sliding windows, ALiBi.
"""

from __future__ import annotations

import math

import torch

from kvcache.errors import KernelError
from kvcache.kernels import checks
from kvcache.kernels.dispatch import Backend, select_backend

__all__ = ["check_decode_args", "paged_decode_attention", "paged_decode_attention_reference"]


def paged_decode_attention_reference(
    q: torch.Tensor,
    pool: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``softmax(q K^T * scale) V`` per sequence; ``q`` ``[num_seqs, num_heads, head_dim]``."""
    _, _, _, block_size, kv_heads, head_dim = pool.shape
    group = q.shape[1] // kv_heads
    out = torch.empty_like(q)
    for s, seq_len in enumerate(seq_lens.tolist()):
        ids = block_tables[s, : -(-seq_len // block_size)].to(device=pool.device, dtype=torch.int64)
        k = pool[layer, 0].index_select(0, ids).reshape(-1, kv_heads, head_dim)[:seq_len]  # [T, H_kv, D]
        v = pool[layer, 1].index_select(0, ids).reshape(-1, kv_heads, head_dim)[:seq_len]
        k = k.repeat_interleave(group, dim=1).float()  # [T, num_heads, D]
        v = v.repeat_interleave(group, dim=1).float()
        scores = torch.einsum("hd,thd->ht", q[s].float(), k) * scale  # [num_heads, T]
        out[s] = torch.einsum("ht,thd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out


def check_decode_args(
    q: object, pool: object, layer: object, block_tables: object, seq_lens: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(q, pool, block_tables, seq_lens, max_len)`` checked; tables and lengths as int64 on the
    pool's device, ``max_len`` the longest sequence (0 for an empty batch)."""
    pool_t = checks.check_pool(pool)
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
    if q.dtype not in checks.SUPPORTED_DTYPES or q.device != pool_t.device:
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


def paged_decode_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of one new token per sequence over its cached tokens in the pool.

    ``q`` ``[num_seqs, num_heads, head_dim]``; ``block_tables`` ``[num_seqs, max_blocks]`` lists each
    sequence's blocks in order (entries past its length are ignored); ``seq_lens`` ``[num_seqs]``
    counts its cached tokens (the new token's own K/V included once written). ``scale`` defaults to
    ``1 / sqrt(head_dim)``. Returns ``[num_seqs, num_heads, head_dim]`` in ``q``'s dtype.
    """
    pool = checks.check_pool(pool)
    scale = 1.0 / math.sqrt(pool.shape[-1]) if scale is None else float(scale)
    if select_backend(pool.device, backend) == "triton":
        from kvcache.kernels import triton_attention

        out: torch.Tensor = triton_attention.paged_decode_attention(
            q, pool, layer, block_tables, seq_lens, scale
        )
        return out
    q, pool, tables, lens, _ = check_decode_args(q, pool, layer, block_tables, seq_lens)
    return paged_decode_attention_reference(q, pool, layer, tables, lens, scale)
