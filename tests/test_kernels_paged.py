"""Paged attention over a ragged batch: the reference against dense causal attention per sequence,
and the Triton kernels (interpreted on CPU) against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernels_support import DEVICE, triton_module

from kvcache.errors import KernelError
from kvcache.kernels.paged import PagedMetadata, paged_attention, write_kv

# (block_size, kv_heads, num_heads, head_dim)
SHAPES = ((4, 2, 4, 16), (16, 1, 3, 8), (3, 2, 2, 12))


def batch(block_size: int, seed: int) -> tuple[list[list[int]], list[int], list[int]]:
    """Sequences in every situation: a fresh prefill, decode tokens, a chunk after a cached prefix,
    one whose context ends exactly on a block boundary. Block ids are shuffled across sequences."""
    seq_lens = [7, 13, 1, 2 * block_size, 21]
    query_lens = [7, 1, 1, block_size + 1, 5]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(64, generator=gen).tolist()
    tables = []
    for n in seq_lens:
        k = -(-n // block_size)
        tables.append(ids[:k])
        ids = ids[k:]
    return tables, seq_lens, query_lens


def dense_reference(
    q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], query_lens: list[int], window: int | None
) -> torch.Tensor:
    """Each sequence alone, dense K/V ``[L, H_kv, D]``, plain causal softmax attention in float64."""
    out, start = [], 0
    for k, v, n in zip(ks, vs, query_lens, strict=True):
        qs = q[start : start + n].double().transpose(0, 1)  # [H, n, D]
        group = qs.shape[0] // k.shape[1]
        kk = k.double().transpose(0, 1).repeat_interleave(group, 0)
        vv = v.double().transpose(0, 1).repeat_interleave(group, 0)
        length = k.shape[0]
        qpos = torch.arange(length - n, length)[:, None]
        kpos = torch.arange(length)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        scores = (qs @ kk.transpose(1, 2)) / qs.shape[-1] ** 0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        out.append((F.softmax(scores, -1) @ vv).transpose(0, 1))
        start += n
    return torch.cat(out).to(q.dtype)


Setup = tuple[torch.Tensor, torch.Tensor, PagedMetadata, list[torch.Tensor], list[torch.Tensor], list[int]]


def setup(shape: tuple[int, int, int, int], seed: int) -> Setup:
    block_size, kv_heads, num_heads, head_dim = shape
    tables, seq_lens, query_lens = batch(block_size, seed)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(2, 2, 64, block_size, kv_heads, head_dim, generator=gen).to(DEVICE)
    ks = [torch.randn(n, kv_heads, head_dim, generator=gen) for n in seq_lens]
    vs = [torch.randn(n, kv_heads, head_dim, generator=gen) for n in seq_lens]
    # The cached part of each sequence is in the pool already; the new tokens' KV is written by write_kv.
    for table, k, v, n_new in zip(tables, ks, vs, query_lens, strict=True):
        for pos in range(k.shape[0] - n_new):
            block, off = table[pos // block_size], pos % block_size
            pool[1, 0, block, off], pool[1, 1, block, off] = k[pos], v[pos]
    md = PagedMetadata.build(tables, seq_lens, query_lens, block_size, pool.device)
    new_k = torch.cat([k[k.shape[0] - n :] for k, n in zip(ks, query_lens, strict=True)]).to(DEVICE)
    new_v = torch.cat([v[v.shape[0] - n :] for v, n in zip(vs, query_lens, strict=True)]).to(DEVICE)
    write_kv(pool, 1, md, new_k, new_v)
    q = torch.randn(md.num_tokens, num_heads, head_dim, generator=gen).to(DEVICE)
    return q, pool, md, ks, vs, query_lens


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_dense_attention_per_sequence(
    shape: tuple[int, int, int, int], window: int | None
) -> None:
    q, pool, md, ks, vs, query_lens = setup(shape, seed=1)
    ours = paged_attention(q, pool, 1, md, sliding_window=window, backend="reference")
    expected = dense_reference(q.cpu(), ks, vs, query_lens, window)
    torch.testing.assert_close(ours.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_equals_the_reference(shape: tuple[int, int, int, int], window: int | None) -> None:
    pytest.importorskip("triton")
    triton_module("triton_attention")
    tp = triton_module("triton_paged")
    q, pool, md, _, _, _ = setup(shape, seed=2)
    expected = paged_attention(q, pool, 1, md, sliding_window=window, backend="reference")
    ours = tp.paged_attention(q, pool, 1, md, 1.0 / shape[3] ** 0.5, window)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_bad_metadata_and_shapes_raise_typed_errors() -> None:
    with pytest.raises(KernelError, match="2 new tokens, context 1"):
        PagedMetadata.build([[0]], [1], [2], 4, torch.device("cpu"))
    with pytest.raises(KernelError, match="1 blocks of 4"):
        PagedMetadata.build([[0]], [5], [1], 4, torch.device("cpu"))
    md = PagedMetadata.build([[0, 1]], [5], [2], 4, torch.device("cpu"))
    pool = torch.zeros(1, 2, 4, 4, 2, 8)
    with pytest.raises(KernelError, match=r"expected \(2, 2, 8\)"):
        write_kv(pool, 0, md, torch.zeros(3, 2, 8), torch.zeros(3, 2, 8))
    with pytest.raises(KernelError, match="layer=1"):
        paged_attention(torch.zeros(2, 4, 8), pool, 1, md)
    with pytest.raises(KernelError, match="multiple of 2 heads"):
        paged_attention(torch.zeros(2, 3, 8), pool, 0, md)


def test_triton_in_bfloat16_stays_within_rounding_of_the_reference() -> None:
    pytest.importorskip("triton")
    triton_module("triton_attention")
    tp = triton_module("triton_paged")
    q, pool, md, _, _, _ = setup((16, 2, 4, 16), seed=3)
    q, pool = q.to(torch.bfloat16), pool.to(torch.bfloat16)
    expected = paged_attention(q.float(), pool.float(), 1, md, backend="reference")
    ours = tp.paged_attention(q, pool, 1, md, 0.25, None)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), expected, atol=2e-2, rtol=2e-2)
