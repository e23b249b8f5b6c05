"""Helpers for the kernel tests: pools of distinct values, naive per-block loops, a usable Triton.

The naive functions state the semantics one block, one layer and one of K/V at a time, with plain
slicing; the kernels must agree with them exactly (every operation is a copy, so equality is exact).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from kvcache.kernels import checks

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (num_layers, num_blocks, block_size, kv_heads, head_dim): degenerate, odd, and a real head_dim.
SHAPES = ((1, 3, 1, 1, 1), (2, 9, 4, 3, 8), (3, 6, 16, 2, 64))


def make_pool(
    shape: tuple[int, int, int, int, int], dtype: torch.dtype, seed: int = 0, device: torch.device = DEVICE
) -> torch.Tensor:
    """A pool ``[L, 2, num_blocks, block_size, H, D]`` whose elements are (almost all) distinct."""
    num_layers, num_blocks, block_size, kv_heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(num_layers, 2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    return values.to(dtype).to(device)


def ids_tensor(
    ids: list[int], dtype: torch.dtype = torch.int64, device: torch.device = DEVICE
) -> torch.Tensor:
    return torch.tensor(ids, dtype=dtype, device=device)


def naive_pack(pool: torch.Tensor, ids: list[int]) -> torch.Tensor:
    num_layers, _, _, block_size, kv_heads, head_dim = pool.shape
    out = torch.full(
        (len(ids), num_layers, 2, block_size, kv_heads, head_dim), float("nan"), dtype=pool.dtype
    )
    for i, block in enumerate(ids):
        out[i] = pool[:, :, block].cpu()
    return out


def naive_unpack(pool: torch.Tensor, ids: list[int], packed: torch.Tensor) -> torch.Tensor:
    out = pool.cpu().clone()
    for i, block in enumerate(ids):
        out[:, :, block] = packed[i].cpu().to(pool.dtype)
    return out


def triton_module(name: str = "triton_kernels") -> ModuleType:
    """``kvcache.kernels.<name>`` (a Triton module) able to run on ``DEVICE``.

    Without CUDA the module is (re)built under the Triton interpreter: ``TRITON_INTERPRET`` is read
    when a kernel is decorated, so it is set for the import only and restored afterwards.
    """
    module = importlib.import_module(f"kvcache.kernels.{name}")
    if DEVICE.type == "cuda" or _interpreted(module):
        return module
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.reload(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    assert _interpreted(module)
    return module


def _interpreted(module: ModuleType) -> bool:
    """Whether every Triton kernel ``module`` holds (those it borrows from another module too) was
    built for the interpreter."""
    from triton.runtime.jit import KernelInterface

    kernels = [value for value in vars(module).values() if isinstance(value, KernelInterface)]
    return all(checks.interpreted(kernel) for kernel in kernels)
