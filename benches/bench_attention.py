"""Paged decode attention against gathering the blocks and calling SDPA, in one run.

The baseline is what a gather-based engine does for one decode step of a batch: one
``index_select`` of every sequence's blocks out of the pool into a dense ``[batch, T, kv_heads, D]``
cache, then ``scaled_dot_product_attention`` with grouped-query heads. Ours is what the engine runs
for the step's decode rows: :func:`kvcache.kernels.paged.paged_attention` on the step's
``PagedMetadata`` (built once per step, off the clock, as the engine shares it across layers),
which reads the blocks in place (the Triton decode kernel on CUDA; on CPU the reference, so the CPU
figure only shows that the path runs). The rate is the KV bytes a step reads.

Workloads: on CUDA one layer of a Qwen2.5-7B-shaped model (28 query heads, 4 KV heads, head_dim 128,
bf16), 32 sequences of 4k tokens; on CPU a Qwen2.5-0.5B shape (14 heads, 2 KV heads, head_dim 64),
8 sequences of 512 tokens.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kvcache.kernels.paged import PagedMetadata, paged_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16
BLOCK_SIZE = 16
if DEVICE.type == "cuda":
    NUM_HEADS, KV_HEADS, HEAD_DIM, BATCH, SEQ_TOKENS = 28, 4, 128, 32, 4096
else:
    NUM_HEADS, KV_HEADS, HEAD_DIM, BATCH, SEQ_TOKENS = 14, 2, 64, 8, 512


def _setup() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    blocks_per_seq = SEQ_TOKENS // BLOCK_SIZE
    num_blocks = BATCH * blocks_per_seq + 64
    pool = torch.randn(1, 2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=gen).to(DTYPE).to(DEVICE)
    tables = torch.randperm(num_blocks, generator=gen)[: BATCH * blocks_per_seq].view(BATCH, blocks_per_seq)
    lens = torch.full((BATCH,), SEQ_TOKENS, dtype=torch.int64)
    q = torch.randn(BATCH, NUM_HEADS, HEAD_DIM, generator=gen).to(DTYPE).to(DEVICE)
    return q, pool, tables, lens  # tables and lengths on the host, as an engine builds them


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _kv_bytes() -> int:
    return BATCH * SEQ_TOKENS * 2 * KV_HEADS * HEAD_DIM * DTYPE.itemsize


@pytest.mark.benchmark(group="decode attention")
def test_gather_then_sdpa_baseline(benchmark: Any) -> None:
    q, pool, tables, _ = _setup()
    flat_ids = tables.reshape(-1).to(DEVICE)

    def run() -> torch.Tensor:
        k = pool[0, 0].index_select(0, flat_ids).view(BATCH, SEQ_TOKENS, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = pool[0, 1].index_select(0, flat_ids).view(BATCH, SEQ_TOKENS, KV_HEADS, HEAD_DIM).transpose(1, 2)
        out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, enable_gqa=True)
        _sync()
        return out[:, :, 0]

    benchmark.extra_info["bytes"] = _kv_bytes()
    out = benchmark.pedantic(run, warmup_rounds=2, rounds=20, iterations=1)
    assert out.shape == (BATCH, NUM_HEADS, HEAD_DIM)


@pytest.mark.benchmark(group="decode attention")
def test_paged_decode(benchmark: Any) -> None:
    q, pool, tables, lens = _setup()
    metadata = PagedMetadata.build(tables.tolist(), lens.tolist(), [1] * BATCH, BLOCK_SIZE, pool.device)

    def run() -> torch.Tensor:
        out = paged_attention(q, pool, 0, metadata)
        _sync()
        return out

    benchmark.extra_info["bytes"] = _kv_bytes()
    out = benchmark.pedantic(run, warmup_rounds=2, rounds=20, iterations=1)
    assert out.shape == (BATCH, NUM_HEADS, HEAD_DIM)
