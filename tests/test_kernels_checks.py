"""Both backends reject bad arguments with a KernelError naming them, before writing anything."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from kernels_support import DEVICE, ids_tensor, make_pool, triton_module

from kvcache.errors import KernelError, KVCacheError
from kvcache.kernels import checks
from kvcache.kernels.dispatch import pack_blocks, select_backend, unpack_blocks

SHAPE = (2, 5, 4, 3, 8)  # num_layers, num_blocks, block_size, kv_heads, head_dim
META = torch.device("meta")  # a device that is neither the CPU nor the pool's


@pytest.fixture(params=["reference", "triton"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "triton":
        pytest.importorskip("triton")
        triton_module()
    return str(request.param)


def pool_() -> torch.Tensor:
    return make_pool(SHAPE, torch.float16)


def packed_(n: int, **kw: Any) -> torch.Tensor:
    return torch.zeros(
        n, 2, 2, 4, 3, 8, dtype=kw.get("dtype", torch.float16), device=kw.get("device", DEVICE)
    )


BAD_CALLS: dict[str, tuple[Callable[..., Any], str]] = {
    "pool not a tensor": (
        lambda b: pack_blocks([[0.0]], ids_tensor([0]), backend=b),
        "pool must be a torch.Tensor",
    ),
    "pool of 5 dims": (lambda b: pack_blocks(pool_()[0], ids_tensor([0]), backend=b), "expected 6 dims"),
    "pool without K/V axis": (
        lambda b: pack_blocks(torch.zeros(2, 3, 5, 4, 3, 8, device=DEVICE), ids_tensor([0]), backend=b),
        "2 = (K, V)",
    ),
    "pool of ints": (
        lambda b: pack_blocks(
            torch.zeros(2, 2, 5, 4, 3, 8, dtype=torch.int32, device=DEVICE), ids_tensor([0]), backend=b
        ),
        "pool has dtype torch.int32",
    ),
    "pool not contiguous": (
        lambda b: pack_blocks(pool_().transpose(3, 4), ids_tensor([0]), backend=b),
        "pool is not contiguous",
    ),
    "ids as a list": (
        lambda b: pack_blocks(pool_(), [0, 1], backend=b),
        "block_ids must be a 1-D torch.Tensor",
    ),
    "ids of 2 dims": (
        lambda b: pack_blocks(pool_(), ids_tensor([[0, 1]]), backend=b),
        "block_ids must be 1-D",
    ),
    "ids of floats": (
        lambda b: pack_blocks(pool_(), torch.tensor([0.0], device=DEVICE), backend=b),
        "block_ids has dtype torch.float32",
    ),
    "id past the pool": (
        lambda b: pack_blocks(pool_(), ids_tensor([1, 5]), backend=b),
        "block id 5, outside the pool's 5 blocks",
    ),
    "negative id": (lambda b: pack_blocks(pool_(), ids_tensor([-1]), backend=b), "block id -1, outside"),
    "ids on another device": (
        lambda b: pack_blocks(pool_(), torch.tensor([0], device=META), backend=b),
        "block_ids is on meta",
    ),
    "repeated id in a write": (
        lambda b: unpack_blocks(pool_(), ids_tensor([2, 2]), packed_(2), backend=b),
        "repeats a block id",
    ),
    "packed of the wrong count": (
        lambda b: unpack_blocks(pool_(), ids_tensor([0, 1]), packed_(1), backend=b),
        "packed has shape (1, 2, 2, 4, 3, 8)",
    ),
    "packed of ints": (
        lambda b: unpack_blocks(pool_(), ids_tensor([0]), packed_(1, dtype=torch.int64), backend=b),
        "packed has dtype torch.int64",
    ),
    "packed on another device": (
        lambda b: unpack_blocks(pool_(), ids_tensor([0]), packed_(1, device=META), backend=b),
        "packed is on meta",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_argument_is_rejected_by_name(backend: str, case: str) -> None:
    call, message = BAD_CALLS[case]
    with pytest.raises(KernelError) as err:
        call(backend)
    assert message in str(err.value)
    assert isinstance(err.value, KVCacheError) and isinstance(err.value, ValueError)


def test_failed_write_leaves_the_pool_unchanged(backend: str) -> None:
    pool = pool_()
    before = pool.clone()
    with pytest.raises(KernelError, match="block id 9"):
        unpack_blocks(pool, ids_tensor([0, 9]), packed_(2) + 1, backend=backend)
    with pytest.raises(KernelError, match="packed has shape"):
        unpack_blocks(pool, ids_tensor([0, 1]), packed_(3) + 1, backend=backend)
    assert torch.equal(pool, before)


def test_unknown_backend_names_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KernelError, match=r"backend='cuda' is unknown; expected one of \('auto'"):
        pack_blocks(pool_(), ids_tensor([0]), backend="cuda")
    monkeypatch.setenv("KVCACHE_KERNEL_BACKEND", "fast")
    with pytest.raises(KernelError, match="KVCACHE_KERNEL_BACKEND='fast' is unknown"):
        select_backend(torch.device("cpu"))


def test_triton_refuses_cpu_tensors_outside_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    module = triton_module()
    monkeypatch.setattr(checks, "interpreted", lambda kernel: False)
    cpu_pool = make_pool(SHAPE, torch.float16, device=torch.device("cpu"))
    with pytest.raises(KernelError, match="need pool on a CUDA device, got cpu"):
        module.pack_blocks(cpu_pool, torch.tensor([0]))
