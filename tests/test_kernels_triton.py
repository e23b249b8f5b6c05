"""The Triton kernels against the reference, element for element.

On a CUDA machine the kernels run compiled on the GPU; without one they run on CPU tensors in the
Triton interpreter, which executes the same kernel code (indexing, masks, int64 offsets, the tile
loop) with numpy, so CI checks everything but the compiler.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from kernels_support import DEVICE, DTYPES, ids_tensor, make_pool, triton_module

from kvcache.kernels import reference
from kvcache.kernels.dispatch import select_backend

pytest.importorskip("triton")

# (num_layers, num_blocks, block_size, kv_heads, head_dim): one element per block, an odd count
# (a masked tile), a block of 8192 elements (two tiles), a typical 16-token block of small heads.
SHAPES = ((1, 3, 1, 1, 1), (2, 5, 3, 5, 12), (1, 4, 16, 4, 128), (2, 5, 16, 2, 64))


@pytest.fixture(scope="module")
def tk() -> ModuleType:
    return triton_module()


def some_ids(num_blocks: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [int(b) for b in torch.randperm(num_blocks, generator=gen)[: max(1, num_blocks - 2)]]


def dense(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_op_equals_the_reference(
    tk: ModuleType, shape: tuple[int, int, int, int, int], dtype: torch.dtype
) -> None:
    num_layers, num_blocks, block_size, kv_heads, head_dim = shape
    pool = make_pool(shape, dtype)
    ids = ids_tensor(some_ids(num_blocks, seed=1))
    n = ids.numel()

    assert torch.equal(tk.pack_blocks(pool, ids), reference.pack_blocks(pool, ids))

    packed = dense((n, num_layers, 2, block_size, kv_heads, head_dim), dtype, seed=3)
    ours, theirs = pool.clone(), pool.clone()
    tk.unpack_blocks(ours, ids, packed)
    reference.unpack_blocks(theirs, ids, packed)
    assert torch.equal(ours, theirs)


def test_strided_sources_are_read_through_their_strides(tk: ModuleType) -> None:
    pool = make_pool((2, 6, 4, 3, 8), torch.float16)
    ids = ids_tensor([5, 1, 3])
    # A buffer laid out [L, 2, n, bs, H, D] and viewed as [n, L, 2, bs, H, D]: not contiguous.
    packed = dense((2, 2, 3, 4, 3, 8), torch.float16, seed=7).permute(2, 0, 1, 3, 4, 5)
    assert not packed.is_contiguous()
    ours, theirs = pool.clone(), pool.clone()
    tk.unpack_blocks(ours, ids, packed)
    reference.unpack_blocks(theirs, ids, packed)
    assert torch.equal(ours, theirs)


def test_writes_convert_dtype_like_the_reference(tk: ModuleType) -> None:
    pool = make_pool((2, 6, 4, 3, 8), torch.bfloat16)
    ids = ids_tensor([4, 0])
    packed = dense((2, 2, 2, 4, 3, 8), torch.float32, seed=8)
    ours, theirs = pool.clone(), pool.clone()
    tk.unpack_blocks(ours, ids, packed)
    reference.unpack_blocks(theirs, ids, packed)
    assert torch.equal(ours, theirs)


def test_int32_ids_held_on_the_cpu(tk: ModuleType) -> None:
    pool = make_pool((2, 6, 4, 3, 8), torch.float32)
    ids = torch.tensor([2, 5, 2], dtype=torch.int32)  # a read may repeat a block
    assert torch.equal(tk.pack_blocks(pool, ids), reference.pack_blocks(pool, ids.long().to(DEVICE)))


def test_empty_ids_launch_nothing(tk: ModuleType) -> None:
    pool = make_pool((2, 6, 4, 3, 8), torch.float32)
    before = pool.clone()
    empty = ids_tensor([])
    assert tk.pack_blocks(pool, empty).shape == (0, 2, 2, 4, 3, 8)
    tk.unpack_blocks(pool, empty, torch.empty(0, 2, 2, 4, 3, 8, device=DEVICE))
    assert torch.equal(pool, before)


def test_auto_dispatch_picks_triton_for_cuda_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVCACHE_KERNEL_BACKEND", raising=False)
    assert select_backend(torch.device("cuda", 0)) == "triton"
    assert select_backend(torch.device("cpu")) == "reference"
    assert select_backend(torch.device("cuda", 0), "reference") == "reference"
    monkeypatch.setenv("KVCACHE_KERNEL_BACKEND", "reference")
    assert select_backend(torch.device("cuda", 0)) == "reference"
    monkeypatch.setenv("KVCACHE_KERNEL_BACKEND", "triton")
    assert select_backend(torch.device("cpu")) == "triton"
