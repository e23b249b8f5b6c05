"""The one place that picks a kernel implementation, per call, from the pool's device.

The folder ``kernels/`` installs as ``kvcache.kernels``. It is a namespace package on purpose (no
``__init__.py``): Hugging Face's ``kernels`` package, which transformers imports, is a regular package,
and a regular package always wins over a namespace portion found earlier on ``sys.path``, so this folder
can never shadow it, even when Python starts in the repository root with ``-m`` or ``-c``.

Callers import the block copies (:func:`pack_blocks`, :func:`unpack_blocks`) from here and
:func:`~kvcache.kernels.paged.paged_attention` from :mod:`kvcache.kernels.paged` (which asks
:func:`select_backend` too), never from a backend module.

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

__all__ = ["BACKEND_ENV", "Backend", "pack_blocks", "select_backend", "unpack_blocks"]

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
        return "triton" if device.type == "cuda" and _triton_module() is not None else "reference"
    if choice == "triton" and _triton_module() is None:
        raise KernelError(
            "the Triton backend was requested but `import triton` fails; install triton, "
            f"or use backend='reference' / {BACKEND_ENV}=reference"
        )
    return choice


def _triton() -> ModuleType:
    module = _triton_module()
    assert module is not None, "select_backend returned triton without an importable module"
    return module


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
