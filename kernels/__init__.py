"""Block copy kernels (installed as ``kvcache.kernels``): gather, scatter and tier copies.

Import the functions from here; :mod:`kvcache.kernels.dispatch` picks the backend per call.
"""

from kvcache.kernels.dispatch import gather_kv, pack_blocks, scatter_kv, unpack_blocks

__all__ = ["gather_kv", "pack_blocks", "scatter_kv", "unpack_blocks"]
