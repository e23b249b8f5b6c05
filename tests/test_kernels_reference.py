"""The reference block copies (through the dispatch point) against naive per-block loops, and round trips."""

from __future__ import annotations

import pytest
import torch
from kernels_support import DEVICE, DTYPES, SHAPES, ids_tensor, make_pool, naive_pack, naive_unpack

from kvcache.kernels.dispatch import pack_blocks, select_backend, unpack_blocks

BACKEND = "reference"


def scrambled_ids(num_blocks: int, seed: int = 1) -> list[int]:
    """About two thirds of the blocks, distinct, in an order unlike the pool's."""
    gen = torch.Generator().manual_seed(seed)
    return [int(b) for b in torch.randperm(num_blocks, generator=gen)[: max(1, 2 * num_blocks // 3)]]


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


def test_pack_allows_repeated_ids_and_int32() -> None:
    pool = make_pool(SHAPES[1], torch.float32)
    ids = [4, 4, 0, 8]
    packed = pack_blocks(pool, ids_tensor(ids, torch.int32), backend=BACKEND)
    assert torch.equal(packed.cpu(), naive_pack(pool, ids))


def test_unpack_converts_a_float32_buffer_into_a_bfloat16_pool() -> None:
    pool = make_pool(SHAPES[1], torch.bfloat16)
    ids = [7, 2]
    gen = torch.Generator().manual_seed(4)
    packed = torch.randn(len(ids), *pool.shape[:2], *pool.shape[3:], generator=gen).to(DEVICE)
    expected = naive_unpack(pool, ids, packed)
    unpack_blocks(pool, ids_tensor(ids), packed, backend=BACKEND)
    assert torch.equal(pool.cpu(), expected)


def test_empty_ids_move_nothing() -> None:
    pool = make_pool(SHAPES[1], torch.float16)
    before = pool.clone()
    empty = ids_tensor([])
    assert pack_blocks(pool, empty, backend=BACKEND).shape == (0, 2, 2, 4, 3, 8)
    unpack_blocks(pool, empty, torch.empty(0, 2, 2, 4, 3, 8, dtype=torch.float16, device=DEVICE))
    assert torch.equal(pool, before)


def test_ids_on_cpu_serve_a_pool_on_any_device() -> None:
    pool = make_pool(SHAPES[1], torch.float32)
    out = pack_blocks(pool, torch.tensor([3, 1]), backend=BACKEND)
    assert torch.equal(out.cpu(), naive_pack(pool, [3, 1]))


def test_auto_picks_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVCACHE_KERNEL_BACKEND", raising=False)
    assert select_backend(torch.device("cpu")) == "reference"
    assert select_backend(torch.device("cpu"), "reference") == "reference"
    monkeypatch.setenv("KVCACHE_KERNEL_BACKEND", "reference")
    assert select_backend(torch.device("cuda")) == "reference"
