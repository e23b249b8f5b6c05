"""Triton paged decode attention: programs per (sequence, KV head, split) walk the sequence's blocks.

A program loads the ``group = num_heads // kv_heads`` query heads that share one KV head, then for
each block of its range loads that block's K and V rows of the head once (``[block_size,
head_dim]``, straight from the pool) and folds them into a running softmax (the max, the sum of
exponentials and the weighted sum of V, rescaled as the max grows), all in float32. Nothing is
gathered into a contiguous cache first, so the bytes read are exactly the sequence's KV once.

When the batch has fewer (sequence, KV head) pairs than the GPU has SMs, each sequence's blocks are
cut into ranges handled by separate programs (flash-decoding); each writes its partial softmax state
and torch merges them (rescale to the common max, then normalise). With one split the kernel writes
the output itself.

Products are broadcast multiplies and reductions rather than ``tl.dot`` (which needs every dimension
>= 16, and a decode step has a single query row per head); the kernel is bound by reading KV anyway.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before import). Callers use :func:`kvcache.kernels.paged.paged_attention`, which sends a step's decode
rows here on CUDA; its reference (``paged_attention_reference``) is the specification.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcache.errors import KernelError
from kvcache.kernels.checks import check_decode_args, check_triton_device

__all__ = ["paged_decode_attention"]


# Reductions go through tl.reduce with this module's combine functions and constants come from
# tl.full, not tl.sum / tl.max / tl.zeros (themselves @jit functions of triton.language): the kernel
# then also runs when the interpreter is switched on after triton.language was imported, since only
# this module's functions need rebuilding for it. Compiled, tl.sum is exactly this reduce.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    out_ptr,
    k_base_ptr,  # pool[layer, 0]
    v_base_ptr,  # pool[layer, 1]
    tables_ptr,
    lens_ptr,
    part_m_ptr,  # [num_seqs, num_heads, num_splits] float32, written when SPLIT
    part_l_ptr,  # same shape
    part_acc_ptr,  # [num_seqs, num_heads, num_splits, HEAD_DIM] float32
    scale,
    num_heads,
    blocks_per_split,
    q_s_seq,
    q_s_head,
    out_s_seq,
    out_s_head,
    tables_s_seq,
    kv_s_block,
    kv_s_tok,
    kv_s_head,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_SIZE_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    SPLIT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, GROUP_P2)
    t = tl.arange(0, BLOCK_SIZE_P2)
    d = tl.arange(0, HEAD_DIM_P2)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(
        q_ptr + seq * q_s_seq + heads[:, None] * q_s_head + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)  # [G, D]
    seq_len = tl.load(lens_ptr + seq)
    num_blocks = (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    first_block = split * blocks_per_split
    end_block = tl.minimum(first_block + blocks_per_split, num_blocks)  # a split may get none
    m = tl.full((GROUP_P2,), float("-inf"), tl.float32)  # running max of the scores
    denom = tl.full((GROUP_P2,), 0.0, tl.float32)  # running sum of exp(score - m)
    acc = tl.full((GROUP_P2, HEAD_DIM_P2), 0.0, tl.float32)  # running sum of exp(score - m) * v
    for b in range(first_block, end_block):
        block = tl.load(tables_ptr + seq * tables_s_seq + b).to(tl.int64)
        tok = b * BLOCK_SIZE + t
        t_mask = (t < BLOCK_SIZE) & (tok < seq_len)
        rows = block * kv_s_block + t[:, None] * kv_s_tok + kv_head * kv_s_head + d[None, :]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base_ptr + rows, mask=kv_mask, other=0.0).to(tl.float32)  # [T, D]
        scores = tl.reduce(q[:, None, :] * k[None, :, :], 2, _add) * scale  # [G, T]
        scores = tl.where(t_mask[None, :], scores, float("-inf"))
        # Every block holds at least one valid token, so m_new is finite and no exp sees -inf - -inf.
        m_new = tl.maximum(m, tl.reduce(scores, 1, _maximum))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])  # [G, T]
        v = tl.load(v_base_ptr + rows, mask=kv_mask, other=0.0).to(tl.float32)  # [T, D]
        acc = acc * alpha[:, None] + tl.reduce(p[:, :, None] * v[None, :, :], 1, _add)
        denom = denom * alpha + tl.reduce(p, 1, _add)
        m = m_new
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        # Partial state of this split; an empty split leaves m = -inf, denom = 0, acc = 0.
        row = (seq * num_heads + heads) * tl.num_programs(2) + split  # [G]
        tl.store(part_m_ptr + row, m, mask=g_mask)
        tl.store(part_l_ptr + row, denom, mask=g_mask)
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)
    else:
        result = acc / denom[:, None]
        tl.store(out_ptr + seq * out_s_seq + heads[:, None] * out_s_head + d[None, :], result, mask=out_mask)


def paged_decode_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its cached tokens in the pool, checked first.

    ``q`` ``[num_seqs, num_heads, head_dim]``; ``block_tables`` ``[num_seqs, max_blocks]`` lists each
    sequence's blocks in order (entries past its length are ignored); ``seq_lens`` ``[num_seqs]``
    counts its cached tokens (the new token's own K/V included once written). Query head ``h``
    reads KV head ``h // (num_heads // kv_heads)``. Returns ``[num_seqs, num_heads, head_dim]`` in
    ``q``'s dtype.

    ``num_splits`` cuts each sequence's blocks into that many ranges handled by separate programs
    (flash-decoding), whose partial softmax states are then merged; by default 1 when the batch
    already gives every SM a program, else enough splits for about two programs per SM.
    """
    q, pool, tables, lens, max_len = check_decode_args(q, pool, layer, block_tables, seq_lens)
    check_triton_device(pool, _paged_decode_kernel, __name__)
    num_seqs, num_heads, head_dim = q.shape
    _, _, _, block_size, kv_heads, _ = pool.shape
    group = num_heads // kv_heads
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    max_blocks = -(-max_len // block_size)
    if num_splits is None:
        num_splits = _default_splits(pool.device, num_seqs * kv_heads, max_blocks)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise KernelError(f"num_splits={num_splits!r} must be a positive int")
    blocks_per_split = -(-max_blocks // num_splits)
    num_splits = -(-max_blocks // blocks_per_split)  # no split starts past every sequence
    split = num_splits > 1
    part_shape = (num_seqs, num_heads, num_splits) if split else (1, 1, 1)
    part_m = torch.empty(part_shape, dtype=torch.float32, device=pool.device)
    part_l = torch.empty(part_shape, dtype=torch.float32, device=pool.device)
    part_acc = torch.empty((*part_shape, head_dim if split else 1), dtype=torch.float32, device=pool.device)
    k_base, v_base = pool[layer, 0], pool[layer, 1]  # [num_blocks, block_size, H_kv, D] views
    _paged_decode_kernel[(num_seqs, kv_heads, num_splits)](
        q,
        out,
        k_base,
        v_base,
        tables,
        lens,
        part_m,
        part_l,
        part_acc,
        scale,
        num_heads,
        blocks_per_split,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        tables.stride(0),
        k_base.stride(0),
        k_base.stride(1),
        k_base.stride(2),
        GROUP=group,
        GROUP_P2=triton.next_power_of_2(group),
        BLOCK_SIZE=block_size,
        BLOCK_SIZE_P2=triton.next_power_of_2(block_size),
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=triton.next_power_of_2(head_dim),
        SPLIT=split,
    )
    if split:
        # Merge the splits' softmax states: rescale each to the common max, then normalise.
        weight = torch.exp(part_m - part_m.amax(dim=2, keepdim=True))  # [S, H, splits]; empty -> 0
        merged = (weight[..., None] * part_acc).sum(dim=2) / (weight * part_l).sum(dim=2)[..., None]
        out.copy_(merged)
    return out


def _default_splits(device: torch.device, num_programs: int, max_blocks: int) -> int:
    """1 when the batch gives every SM a program; else about two programs per SM."""
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    if num_programs >= num_sms:
        return 1
    return max(1, min(max_blocks, -(-2 * num_sms // num_programs)))
