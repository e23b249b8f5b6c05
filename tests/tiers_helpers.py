"""Small layouts and deterministic blocks for the tier tests (imported by tests/test_tiers_*.py)."""

from __future__ import annotations

import torch

from kvcache.tiers import LayoutFingerprint, TierKey

LAYOUT = LayoutFingerprint("tiny", "bfloat16", num_layers=2, kv_heads=2, head_dim=8, block_size=4)
LAYOUT_F32 = LayoutFingerprint("tiny", "float32", num_layers=2, kv_heads=2, head_dim=8, block_size=4)


def key(i: int, layout: LayoutFingerprint = LAYOUT) -> TierKey:
    return TierKey(i.to_bytes(16, "little"), layout)


def block(i: int, layout: LayoutFingerprint = LAYOUT) -> torch.Tensor:
    """A block whose every element depends on ``i`` (random bits, including NaN patterns)."""
    gen = torch.Generator().manual_seed(i)
    bits = torch.randint(0, 256, (layout.block_nbytes,), dtype=torch.uint8, generator=gen)
    return bits.view(layout.torch_dtype).reshape(layout.block_shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included), which ``torch.equal`` does not give for floats."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
