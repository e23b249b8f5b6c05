"""Block copy kernels (installed as ``kvcache.kernels``): gather, scatter and tier copies."""
