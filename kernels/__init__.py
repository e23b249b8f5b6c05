"""Block copy kernels (installed as ``kvcache.kernels``): gather, scatter, pack and tier copies.

Import the functions from here; :mod:`kvcache.kernels.dispatch` checks the arguments and picks the
backend per call (Triton on CUDA when it imports, else the pure-torch reference). Bad arguments
raise :class:`kvcache.errors.KernelError`. :func:`paged_decode_attention` attends one new token per
sequence over its blocks in the pool, without gathering them.
"""

from kvcache.kernels.attention import paged_decode_attention
from kvcache.kernels.dispatch import (
    BACKEND_ENV,
    Backend,
    copy_blocks,
    gather_kv,
    pack_blocks,
    scatter_kv,
    select_backend,
    triton_available,
    unpack_blocks,
)

__all__ = [
    "BACKEND_ENV",
    "Backend",
    "copy_blocks",
    "gather_kv",
    "pack_blocks",
    "paged_decode_attention",
    "scatter_kv",
    "select_backend",
    "triton_available",
    "unpack_blocks",
]
