"""Triton paged attention for a ragged batch: a prefill kernel plus the decode kernel.

Decode rows (one new token) go to :func:`kvcache.kernels.triton_attention.paged_decode_attention`
(flash-decoding over the sequence's blocks) unless a sliding window applies. Prefill rows run
``_paged_prefill_kernel``: one program per (sequence, query head, tile of ``BLOCK_M`` new tokens)
walks the sequence's blocks in order, straight from the pool, up to its last row's position (the
causal bound), and folds each block into a running softmax in float32 (``tl.dot`` with IEEE
precision). Tiles are padded to 16 in every ``tl.dot`` dimension and masked. Nothing is gathered.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` when
this module is imported). Callers use :func:`kvcache.kernels.paged.paged_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcache.kernels import triton_attention
from kvcache.kernels.checks import check_triton_device
from kvcache.kernels.paged import PagedMetadata, paged_attention_reference

__all__ = ["paged_attention"]

BLOCK_M = 16


# The combine functions of ``tl.reduce``, shared with the decode kernel.
_add = triton_attention._add
_maximum = triton_attention._maximum


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    out_ptr,
    k_base_ptr,  # pool[layer, 0]
    v_base_ptr,  # pool[layer, 1]
    rows_ptr,  # [num_prefill] sequence index of each prefill row
    tables_ptr,
    qsl_ptr,
    lens_ptr,
    scale,
    window,
    q_s_tok,
    q_s_head,
    o_s_tok,
    o_s_head,
    tables_s_seq,
    kv_s_block,
    kv_s_tok,
    kv_s_head,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_SIZE_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    USE_WINDOW: tl.constexpr,
):
    seq = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(lens_ptr + seq)
    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    t = tl.arange(0, BLOCK_SIZE_P2)
    d = tl.arange(0, HEAD_DIM_P2)
    row_mask = i < q_len
    d_mask = d < HEAD_DIM
    qpos = seq_len - q_len + i  # [M] absolute positions of this tile's tokens
    q = tl.load(
        q_ptr + (q_start + i)[:, None] * q_s_tok + head * q_s_head + d[None, :],
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)  # [M, D]
    last = tl.minimum(seq_len, seq_len - q_len + (tile + 1) * BLOCK_M)  # keys up to the last row
    end_block = (last + BLOCK_SIZE - 1) // BLOCK_SIZE
    first_block = 0
    if USE_WINDOW:
        first_pos = seq_len - q_len + tile * BLOCK_M
        first_block = tl.maximum(first_pos - window + 1, 0) // BLOCK_SIZE
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    denom = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, HEAD_DIM_P2), 0.0, tl.float32)
    for b in range(first_block, end_block):
        block = tl.load(tables_ptr + seq * tables_s_seq + b).to(tl.int64)
        kpos = b * BLOCK_SIZE + t
        t_mask = t < BLOCK_SIZE
        rows = block * kv_s_block + t[:, None] * kv_s_tok + kv_head * kv_s_head + d[None, :]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base_ptr + rows, mask=kv_mask, other=0.0).to(tl.float32)  # [T, D]
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [M, T]
        valid = t_mask[None, :] & (kpos[None, :] <= qpos[:, None])
        if USE_WINDOW:
            valid = valid & (kpos[None, :] > qpos[:, None] - window)
        scores = tl.where(valid, scores, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(scores, 1, _maximum))
        # A row that has seen no valid key yet keeps m = -inf; shift by 0 there so exp gives 0, not nan.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        p = tl.exp(scores - shift[:, None])  # [M, T]
        v = tl.load(v_base_ptr + rows, mask=kv_mask, other=0.0).to(tl.float32)  # [T, D]
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        denom = denom * alpha + tl.reduce(p, 1, _add)
        m = m_new
    result = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
    tl.store(
        out_ptr + (q_start + i)[:, None] * o_s_tok + head * o_s_head + d[None, :],
        result,
        mask=row_mask[:, None] & d_mask[None, :],
    )


def paged_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    layer: int,
    metadata: PagedMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """See :func:`kvcache.kernels.paged.paged_attention` (arguments already checked there)."""
    check_triton_device(pool, _paged_prefill_kernel, __name__)
    md = metadata
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, _, _, block_size, kv_heads, _ = pool.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if md.decode_rows:
        if sliding_window is None:
            out[md.decode_tokens] = triton_attention.paged_decode_attention(
                q[md.decode_tokens], pool, layer, md.decode_tables, md.decode_lens, scale
            )
        else:  # the decode kernel has no window; the reference serves these rows
            only = PagedMetadata.build(
                [md.decode_tables[j].tolist() for j in range(len(md.decode_rows))],
                md.decode_lens.tolist(),
                [1] * len(md.decode_rows),
                block_size,
                pool.device,
            )
            out[md.decode_tokens] = paged_attention_reference(
                q[md.decode_tokens], pool, layer, only, scale, sliding_window
            )
    if not md.prefill_rows:
        return out
    qsl = md.query_start_loc
    max_q = max(qsl[s + 1] - qsl[s] for s in md.prefill_rows)
    device = pool.device
    rows = torch.tensor(md.prefill_rows, dtype=torch.int64, device=device)
    qsl_t = torch.tensor(qsl, dtype=torch.int64, device=device)
    lens = torch.tensor(md.seq_lens, dtype=torch.int64, device=device)
    qc = q if q.stride(2) == 1 else q.contiguous()
    k_base, v_base = pool[layer, 0], pool[layer, 1]  # [num_blocks, block_size, H_kv, D] views
    grid = (len(md.prefill_rows), num_heads, triton.cdiv(max_q, BLOCK_M))
    _paged_prefill_kernel[grid](
        qc,
        out,
        k_base,
        v_base,
        rows,
        md.block_tables,
        qsl_t,
        lens,
        scale,
        sliding_window or 0,
        qc.stride(0),
        qc.stride(1),
        out.stride(0),
        out.stride(1),
        md.block_tables.stride(0),
        k_base.stride(0),
        k_base.stride(1),
        k_base.stride(2),
        GROUP=num_heads // kv_heads,
        BLOCK_M=BLOCK_M,
        BLOCK_SIZE=block_size,
        BLOCK_SIZE_P2=max(16, triton.next_power_of_2(block_size)),
        HEAD_DIM=head_dim,
        HEAD_DIM_P2=max(16, triton.next_power_of_2(head_dim)),
        USE_WINDOW=sliding_window is not None,
    )
    return out
