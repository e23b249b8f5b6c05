"""Paged attention for a ragged batch: prefill chunks and decode tokens of many sequences in one call.

A step of the batched engine runs every scheduled token of every sequence through the model as one
flat list of ``N`` tokens. Per layer, attention then needs two operations on the paged pool
``[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]``:

- :func:`write_kv` stores each new token's K and V in its slot (``slot = block_id * block_size +
  offset``), straight into the pool;
- :func:`paged_attention` attends each sequence's new tokens (causally, at the end of its context)
  over that sequence's blocks, read in place through its block table.

Write first, then attend: a sequence reads its own new tokens' KV, and a block another sequence
fills in the same step, from the pool. :class:`PagedMetadata` describes the batch once per step
(block tables, context lengths, where each sequence's tokens start in the flat list, slots) and is
shared by every layer.

Sequences with one new token (decode) are attended together in one batched call; longer chunks
(prefill) one sequence at a time. Grouped-query attention: query head ``h`` reads KV head
``h // (num_heads // kv_heads)``. ``sliding_window`` ``w`` keeps keys at positions ``> q - w``
(transformers' convention). :func:`paged_attention_reference` is the specification in plain torch.
On CUDA (backend Triton) the decode part runs the Triton kernel of
:mod:`kvcache.kernels.triton_attention` when no window applies, and the prefill part the Triton
kernel of :mod:`kvcache.kernels.triton_paged`.

Not here: which sequences run or which blocks they own (``kvcache.engine``), model code (``hf``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcache.errors import KernelError
from kvcache.kernels import checks
from kvcache.kernels.dispatch import Backend, select_backend

__all__ = ["PagedMetadata", "paged_attention", "paged_attention_reference", "write_kv"]


@dataclass(frozen=True, slots=True)
class PagedMetadata:
    """One step's batch. ``S`` sequences, ``N`` new tokens in total.

    - ``query_start_loc`` (``S + 1`` ints): sequence ``s`` owns flat tokens ``[qsl[s], qsl[s+1])``;
    - ``seq_lens`` (``S`` ints): its context length after this step (cached + new tokens);
    - ``block_tables`` ``[S, max_blocks]`` int64 on the pool's device (rows padded with block 0);
    - ``slot_mapping`` ``[N]`` int64: the pool slot each new token's KV goes to;
    - ``decode_rows``: sequences with exactly one new token; ``decode_tokens`` their flat token
      indices, ``decode_tables``/``decode_lens`` their rows, for the batched decode call.
    """

    block_size: int
    query_start_loc: list[int]
    seq_lens: list[int]
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    decode_rows: list[int]
    decode_tokens: torch.Tensor
    decode_tables: torch.Tensor
    decode_lens: torch.Tensor
    prefill_rows: list[int]

    @classmethod
    def build(
        cls,
        block_tables: Sequence[Sequence[int]],
        seq_lens: Sequence[int],
        query_lens: Sequence[int],
        block_size: int,
        device: torch.device,
    ) -> PagedMetadata:
        """From per-sequence block id lists, context lengths after the step and new-token counts."""
        if not len(block_tables) == len(seq_lens) == len(query_lens):
            raise KernelError(
                f"{len(block_tables)} block tables, {len(seq_lens)} lengths and {len(query_lens)} query "
                "lengths: give one of each per sequence"
            )
        qsl = [0]
        slots: list[int] = []
        for table, seq_len, q_len in zip(block_tables, seq_lens, query_lens, strict=True):
            if not 1 <= q_len <= seq_len or len(table) * block_size < seq_len:
                raise KernelError(
                    f"a sequence has {q_len} new tokens, context {seq_len} and {len(table)} blocks of "
                    f"{block_size}; need 1 <= new <= context <= blocks * block_size"
                )
            qsl.append(qsl[-1] + q_len)
            for pos in range(seq_len - q_len, seq_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=0)
        padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
        tables = torch.tensor(padded, dtype=torch.int64).reshape(len(padded), width)
        decode_rows = [s for s, n in enumerate(query_lens) if n == 1]
        prefill_rows = [s for s, n in enumerate(query_lens) if n > 1]
        rows = torch.tensor(decode_rows, dtype=torch.int64)
        return cls(
            block_size=block_size,
            query_start_loc=qsl,
            seq_lens=list(seq_lens),
            block_tables=tables.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(device),
            decode_rows=decode_rows,
            decode_tokens=torch.tensor([qsl[s] for s in decode_rows], dtype=torch.int64).to(device),
            decode_tables=tables.index_select(0, rows).to(device),
            decode_lens=torch.tensor([seq_lens[s] for s in decode_rows], dtype=torch.int64).to(device),
            prefill_rows=prefill_rows,
        )

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]


def write_kv(
    pool: torch.Tensor, layer: int, metadata: PagedMetadata, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store new tokens' ``k``/``v`` ``[N, kv_heads, head_dim]`` in their slots of ``pool[layer]``."""
    _, _, _, _, kv_heads, head_dim = pool.shape
    if k.shape != (metadata.num_tokens, kv_heads, head_dim) or v.shape != k.shape:
        raise KernelError(
            f"k/v have shapes {tuple(k.shape)}/{tuple(v.shape)}; expected ({metadata.num_tokens}, "
            f"{kv_heads}, {head_dim}) for this step"
        )
    slots = metadata.slot_mapping
    pool[layer, 0].view(-1, kv_heads, head_dim).index_copy_(0, slots, k.to(pool.dtype))
    pool[layer, 1].view(-1, kv_heads, head_dim).index_copy_(0, slots, v.to(pool.dtype))


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """``q`` ``[B, H, n, D]``, ``k``/``v`` ``[B, H_kv, L, D]``, ``mask`` broadcastable to ``[B, H, n, L]``."""
    # enable_gqa: query head h reads KV head h // group without materialising repeated K/V
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _decode_reference(
    q: torch.Tensor, pool: torch.Tensor, layer: int, md: PagedMetadata, scale: float, window: int | None
) -> torch.Tensor:
    """All one-token sequences at once: their blocks gathered into a padded batch. ``[Sd, H, D]``."""
    _, _, _, bs, kv_heads, head_dim = pool.shape
    num = len(md.decode_rows)
    width = md.decode_tables.shape[1]
    ids = md.decode_tables.reshape(-1)
    k = pool[layer, 0].index_select(0, ids).view(num, width * bs, kv_heads, head_dim).transpose(1, 2)
    v = pool[layer, 1].index_select(0, ids).view(num, width * bs, kv_heads, head_dim).transpose(1, 2)
    kpos = torch.arange(width * bs, device=pool.device)
    lens = md.decode_lens[:, None]
    mask = kpos[None, :] < lens  # [Sd, L]: the new token sits at position len - 1
    if window is not None:
        mask &= kpos[None, :] > lens - 1 - window
    out = _sdpa(q[:, :, None, :], k.to(q.dtype), v.to(q.dtype), mask[:, None, None, :], scale)
    return out[:, :, 0, :]


def _prefill_reference(
    q: torch.Tensor,
    pool: torch.Tensor,
    layer: int,
    table: torch.Tensor,
    seq_len: int,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """One sequence's ``n`` new tokens ``q`` ``[n, H, D]`` at the end of its ``seq_len`` context."""
    _, _, _, bs, kv_heads, head_dim = pool.shape
    n = q.shape[0]
    ids = table[: -(-seq_len // bs)]
    k = pool[layer, 0].index_select(0, ids).view(-1, kv_heads, head_dim)[:seq_len].transpose(0, 1)
    v = pool[layer, 1].index_select(0, ids).view(-1, kv_heads, head_dim)[:seq_len].transpose(0, 1)
    qpos = torch.arange(seq_len - n, seq_len, device=pool.device)[:, None]
    kpos = torch.arange(seq_len, device=pool.device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    out = _sdpa(q.transpose(0, 1)[None], k[None].to(q.dtype), v[None].to(q.dtype), mask, scale)
    return out[0].transpose(0, 1)


def paged_attention_reference(
    q: torch.Tensor,
    pool: torch.Tensor,
    layer: int,
    metadata: PagedMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The specification: ``q`` ``[N, num_heads, head_dim]`` -> ``[N, num_heads, head_dim]``."""
    md = metadata
    out = torch.empty_like(q)
    if md.decode_rows:
        out[md.decode_tokens] = _decode_reference(q[md.decode_tokens], pool, layer, md, scale, sliding_window)
    qsl = md.query_start_loc
    for s in md.prefill_rows:
        start, end = qsl[s], qsl[s + 1]
        out[start:end] = _prefill_reference(
            q[start:end], pool, layer, md.block_tables[s], md.seq_lens[s], scale, sliding_window
        )
    return out


def paged_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    layer: int,
    metadata: PagedMetadata,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of every new token of the step over its sequence's blocks (written first by
    :func:`write_kv`). ``q`` ``[N, num_heads, head_dim]``; returns the same shape and dtype."""
    pool = checks.check_pool(pool)
    num_layers, _, _, _, kv_heads, head_dim = pool.shape
    if q.dim() != 3 or q.shape[0] != metadata.num_tokens or q.shape[2] != head_dim or q.shape[1] % kv_heads:
        raise KernelError(
            f"q has shape {tuple(q.shape)}; expected ({metadata.num_tokens}, a multiple of {kv_heads} "
            f"heads, {head_dim})"
        )
    if not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise KernelError(f"layer={layer!r} is not a layer of the pool's {num_layers}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    window = sliding_window if sliding_window else None
    if select_backend(pool.device, backend) != "triton":
        return paged_attention_reference(q, pool, layer, metadata, scale, window)
    from kvcache.kernels import triton_paged

    out: torch.Tensor = triton_paged.paged_attention(q, pool, layer, metadata, scale, window)
    return out
