"""The reference block copies (through the dispatch point) against naive per-block loops, and round trips."""

from __future__ import annotations

import pytest
import torch
from kernels_support import (
    DEVICE,
    DTYPES,
    SHAPES,
    ids_tensor,
    make_pool,
    naive_copy,
    naive_gather,
    naive_pack,
    naive_scatter,
    naive_unpack,
)

from kvcache.kernels.dispatch import (
    copy_blocks,
    gather_kv,
    pack_blocks,
    scatter_kv,
    select_backend,
    unpack_blocks,
)

BACKEND = "reference"


def scrambled_ids(num_blocks: int, seed: int = 1) -> list[int]:
    """About two thirds of the blocks, distinct, in an order unlike the pool's."""
    gen = torch.Generator().manual_seed(seed)
    return [int(b) for b in torch.randperm(num_blocks, generator=gen)[: max(1, 2 * num_blocks // 3)]]


def dense_like(pool: torch.Tensor, n: int, seed: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    num_layers, _, _, block_size, kv_heads, head_dim = pool.shape
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(num_layers, 2, kv_heads, n * block_size, head_dim, generator=gen)
    return values.to(dtype or pool.dtype).to(pool.device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gather_matches_per_block_loop(shape: tuple[int, int, int, int, int], dtype: torch.dtype) -> None:
    pool = make_pool(shape, dtype)
    ids = scrambled_ids(shape[1])
    out = gather_kv(pool, ids_tensor(ids), backend=BACKEND)
    assert out.shape == (shape[0], 2, shape[3], len(ids) * shape[2], shape[4])
    assert out.dtype == dtype
    assert torch.equal(out.cpu(), naive_gather(pool, ids))


def test_gather_allows_repeated_ids_and_int32() -> None:
    pool = make_pool(SHAPES[1], torch.float32)
    ids = [4, 4, 0, 8]
    out = gather_kv(pool, ids_tensor(ids, torch.int32), backend=BACKEND)
    assert torch.equal(out.cpu(), naive_gather(pool, ids))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_scatter_matches_per_block_loop(shape: tuple[int, int, int, int, int], dtype: torch.dtype) -> None:
    pool = make_pool(shape, dtype)
    ids = scrambled_ids(shape[1], seed=2)
    kv = dense_like(pool, len(ids), seed=3)
    expected = naive_scatter(pool, ids, kv)
    scatter_kv(pool, ids_tensor(ids), kv, backend=BACKEND)
    assert torch.equal(pool.cpu(), expected)


def test_scatter_converts_a_float32_cache_into_a_bfloat16_pool() -> None:
    pool = make_pool(SHAPES[1], torch.bfloat16)
    ids = [7, 2]
    kv = dense_like(pool, len(ids), seed=4, dtype=torch.float32)
    expected = naive_scatter(pool, ids, kv)
    scatter_kv(pool, ids_tensor(ids), kv, backend=BACKEND)
    assert torch.equal(pool.cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_and_unpack_match_per_block_loops(
    shape: tuple[int, int, int, int, int], dtype: torch.dtype
) -> None:
    pool = make_pool(shape, dtype)
    ids = scrambled_ids(shape[1], seed=5)
    packed = pack_blocks(pool, ids_tensor(ids), backend=BACKEND)
    assert packed.is_contiguous()
    assert torch.equal(packed.cpu(), naive_pack(pool, ids))

    target = make_pool(shape, dtype, seed=6)
    expected = naive_unpack(target, ids, packed)
    unpack_blocks(target, ids_tensor(ids), packed, backend=BACKEND)
    assert torch.equal(target.cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks_between_pools_of_different_sizes(dtype: torch.dtype) -> None:
    layout = SHAPES[1]
    src = make_pool(layout, dtype)
    dst = make_pool((layout[0], 4, *layout[2:]), dtype, seed=7)
    src_ids, dst_ids = [8, 1, 5], [2, 0, 3]
    expected = naive_copy(src, src_ids, dst, dst_ids)
    copy_blocks(src, ids_tensor(src_ids), dst, ids_tensor(dst_ids), backend=BACKEND)
    assert torch.equal(dst.cpu(), expected)


def test_copy_blocks_from_device_pool_to_host_tier() -> None:
    src = make_pool(SHAPES[2], torch.bfloat16)
    host = make_pool((SHAPES[2][0], 3, *SHAPES[2][2:]), torch.bfloat16, seed=8, device=torch.device("cpu"))
    expected = naive_copy(src, [5, 0], host, [1, 2])
    copy_blocks(src, torch.tensor([5, 0]), host, torch.tensor([1, 2]))
    assert torch.equal(host, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_scatter_then_gather_is_identity(shape: tuple[int, int, int, int, int], dtype: torch.dtype) -> None:
    pool = make_pool(shape, dtype)
    untouched = pool.clone()
    ids = scrambled_ids(shape[1], seed=9)
    kv = dense_like(pool, len(ids), seed=10)
    scatter_kv(pool, ids_tensor(ids), kv, backend=BACKEND)
    assert torch.equal(gather_kv(pool, ids_tensor(ids), backend=BACKEND), kv)
    others = [b for b in range(shape[1]) if b not in ids]
    assert torch.equal(pool[:, :, others], untouched[:, :, others])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_then_unpack_restores_blocks(shape: tuple[int, int, int, int, int], dtype: torch.dtype) -> None:
    pool = make_pool(shape, dtype)
    ids = scrambled_ids(shape[1], seed=11)
    packed = pack_blocks(pool, ids_tensor(ids), backend=BACKEND)
    fresh = torch.zeros_like(pool)
    unpack_blocks(fresh, ids_tensor(ids), packed, backend=BACKEND)
    assert torch.equal(fresh[:, :, ids], pool[:, :, ids])
    others = [b for b in range(shape[1]) if b not in ids]
    assert not fresh[:, :, others].any()
    assert torch.equal(pack_blocks(fresh, ids_tensor(ids), backend=BACKEND), packed)


def test_empty_ids_move_nothing() -> None:
    pool = make_pool(SHAPES[1], torch.float16)
    before = pool.clone()
    empty = ids_tensor([])
    assert gather_kv(pool, empty, backend=BACKEND).shape == (2, 2, 3, 0, 8)
    assert pack_blocks(pool, empty, backend=BACKEND).shape == (0, 2, 2, 4, 3, 8)
    scatter_kv(pool, empty, dense_like(pool, 0, seed=0), backend=BACKEND)
    unpack_blocks(pool, empty, torch.empty(0, 2, 2, 4, 3, 8, dtype=torch.float16, device=DEVICE))
    assert torch.equal(pool, before)


def test_ids_on_cpu_serve_a_pool_on_any_device() -> None:
    pool = make_pool(SHAPES[1], torch.float32)
    out = gather_kv(pool, torch.tensor([3, 1]), backend=BACKEND)
    assert torch.equal(out.cpu(), naive_gather(pool, [3, 1]))


def test_auto_picks_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVCACHE_KERNEL_BACKEND", raising=False)
    assert select_backend(torch.device("cpu")) == "reference"
    assert select_backend(torch.device("cpu"), "reference") == "reference"
    monkeypatch.setenv("KVCACHE_KERNEL_BACKEND", "reference")
    assert select_backend(torch.device("cuda")) == "reference"
