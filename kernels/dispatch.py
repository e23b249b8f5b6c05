"""The one place that picks an implementation of the block copies, per call, from the pool's device.

The folder ``kernels/`` installs as ``kvcache.kernels``. It is a namespace package on purpose (no
``__init__.py``): Hugging Face's ``kernels`` package, which transformers imports, is a regular package,
and a regular package always wins over a namespace portion found earlier on ``sys.path``, so this folder
can never shadow it, even when Python starts in the repository root with ``-m`` or ``-c``.

Callers import the block copies (gather, scatter, pack, unpack, copy) from here and
:func:`~kvcache.kernels.attention.paged_decode_attention` from :mod:`kvcache.kernels.attention`, never
from a backend module.

The rule, applied on every call (never at import time):

1. ``backend="reference"`` or ``backend="triton"`` forces that backend;
2. otherwise the environment variable ``KVCACHE_KERNEL_BACKEND`` (``reference``, ``triton`` or
   ``auto``) forces one, read on every call so a test or an operator can flip it;
3. otherwise (``auto``): Triton when the pool is on a CUDA device and ``triton`` imports, else the
   pure-torch reference.

Forcing Triton on CPU tensors works only under the Triton interpreter (``TRITON_INTERPRET=1``); the
launchers say so when it is not on. Both backends reject the same bad arguments with
:class:`kvcache.errors.KernelError` before anything is written (see :mod:`kvcache.kernels.checks`).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Literal

import torch

from kvcache.errors import KernelError
from kvcache.kernels import checks, reference

__all__ = [
    "BACKEND_ENV",
    "Backend",
    "copy_blocks",
    "gather_kv",
    "pack_blocks",
    "scatter_kv",
    "select_backend",
    "triton_available",
    "unpack_blocks",
]

Backend = Literal["auto", "reference", "triton"]
BACKEND_ENV = "KVCACHE_KERNEL_BACKEND"
_BACKENDS = ("auto", "reference", "triton")


@functools.cache
def _triton_module() -> ModuleType | None:
    # Cached because a failed import is retried by Python on every attempt; the outcome cannot
    # change within a process.
    try:
        from kvcache.kernels import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def triton_available() -> bool:
    """Whether the Triton backend imports in this process."""
    return _triton_module() is not None


def select_backend(device: torch.device, backend: Backend = "auto") -> str:
    """The backend (``"reference"`` or ``"triton"``) that serves a pool on ``device``."""
    choice: str = backend
    if choice not in _BACKENDS:
        raise KernelError(f"backend={backend!r} is unknown; expected one of {_BACKENDS}")
    if choice == "auto":
        choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
        if choice not in _BACKENDS:
            raise KernelError(
                f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r} is unknown; expected one of {_BACKENDS}"
            )
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if choice == "triton" and not triton_available():
        raise KernelError(
            "the Triton backend was requested but `import triton` fails; install triton, "
            f"or use backend='reference' / {BACKEND_ENV}=reference"
        )
    return choice


def _triton() -> ModuleType:
    module = _triton_module()
    assert module is not None, "select_backend returned triton without an importable module"
    return module


def gather_kv(pool: torch.Tensor, block_ids: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """Blocks ``block_ids`` of ``pool`` as one cache ``[L, 2, kv_heads, n * block_size, head_dim]``."""
    if select_backend(checks.check_pool(pool).device, backend) == "triton":
        out: torch.Tensor = _triton().gather_kv(pool, block_ids)
        return out
    return reference.gather_kv(pool, checks.check_block_ids(block_ids, pool))


def scatter_kv(
    pool: torch.Tensor, block_ids: torch.Tensor, kv: torch.Tensor, *, backend: Backend = "auto"
) -> None:
    """Write ``kv`` ``[L, 2, kv_heads, n * block_size, head_dim]`` into blocks ``block_ids`` of ``pool``."""
    if select_backend(checks.check_pool(pool).device, backend) == "triton":
        _triton().scatter_kv(pool, block_ids, kv)
        return
    ids = checks.check_block_ids(block_ids, pool, unique=True)
    reference.scatter_kv(pool, ids, checks.check_dense_kv(kv, pool, ids.numel()))


def pack_blocks(pool: torch.Tensor, block_ids: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """Blocks ``block_ids`` as a block-major buffer ``[n, L, 2, block_size, kv_heads, head_dim]``."""
    if select_backend(checks.check_pool(pool).device, backend) == "triton":
        out: torch.Tensor = _triton().pack_blocks(pool, block_ids)
        return out
    return reference.pack_blocks(pool, checks.check_block_ids(block_ids, pool))


def unpack_blocks(
    pool: torch.Tensor, block_ids: torch.Tensor, packed: torch.Tensor, *, backend: Backend = "auto"
) -> None:
    """Write a block-major buffer ``[n, L, 2, block_size, kv_heads, head_dim]`` into ``block_ids``."""
    if select_backend(checks.check_pool(pool).device, backend) == "triton":
        _triton().unpack_blocks(pool, block_ids, packed)
        return
    ids = checks.check_block_ids(block_ids, pool, unique=True)
    reference.unpack_blocks(pool, ids, checks.check_block_major(packed, pool, ids.numel()))


def copy_blocks(
    src_pool: torch.Tensor,
    src_ids: torch.Tensor,
    dst_pool: torch.Tensor,
    dst_ids: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> None:
    """Copy blocks ``src_ids`` of ``src_pool`` into blocks ``dst_ids`` of ``dst_pool``.

    The pools may live on different devices (a GPU pool and a host tier); Triton serves only copies
    within one CUDA device, so a copy across devices always takes the reference path (one gather on
    the source, one transfer, one write on the destination).
    """
    src, dst = checks.check_pool_pair(src_pool, dst_pool)
    same_device = src.device == dst.device
    if same_device and select_backend(dst.device, backend) == "triton":
        _triton().copy_blocks(src, src_ids, dst, dst_ids)
        return
    if not same_device and backend == "triton":
        raise KernelError(
            f"backend='triton' copies within one device; src_pool is on {src.device} and dst_pool on "
            f"{dst.device}: use backend='auto' for copies across devices"
        )
    reference.copy_blocks(*checks.check_copy(src, src_ids, dst, dst_ids))
