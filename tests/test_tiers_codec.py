"""The stored block format: round trips bit for bit; every kind of damage is a CorruptBlockError."""

from __future__ import annotations

import pytest
import torch
from tiers_helpers import LAYOUT, LAYOUT_F32, block, key, same_bits

from kvcache.errors import CorruptBlockError, TierError
from kvcache.tiers import LayoutFingerprint, TierKey, codec


@pytest.mark.parametrize("layout", [LAYOUT, LAYOUT_F32])
def test_round_trip_is_bitwise(layout: LayoutFingerprint) -> None:
    data = codec.encode(key(1, layout), block(1, layout))
    assert len(data) == codec.HEADER_BYTES + layout.block_nbytes == 128 + 256 * layout.torch_dtype.itemsize
    assert data[:4] == b"KVCB"
    assert same_bits(codec.decode(data, key(1, layout)), block(1, layout))
    out = torch.empty(layout.block_shape, dtype=layout.torch_dtype)
    assert codec.decode(data, key(1, layout), out) is out and same_bits(out, block(1, layout))


@pytest.mark.parametrize("offset", [0, 5, 9, 20, 40, 56, 70, 100, 127, 128, 300, 128 + 511])
def test_any_flipped_byte_is_caught(offset: int) -> None:
    data = bytearray(codec.encode(key(1), block(1)))
    data[offset] ^= 0x40
    with pytest.raises(CorruptBlockError):
        codec.decode(data, key(1))


def test_truncation_wrong_key_and_wrong_layout_are_caught() -> None:
    data = codec.encode(key(1), block(1))
    with pytest.raises(CorruptBlockError, match="truncated"):
        codec.decode(data[:100], key(1))
    with pytest.raises(CorruptBlockError, match="payload is 511 bytes"):
        codec.decode(data[:-1], key(1))
    with pytest.raises(CorruptBlockError, match="holds key"):
        codec.decode(data, key(2))
    other = LayoutFingerprint("other-model", "bfloat16", 2, 2, 8, 4)  # same shape, other model
    with pytest.raises(CorruptBlockError, match="another layout"):
        codec.decode(data, TierKey(key(1).key, other))


def test_layout_checks_name_the_problem() -> None:
    with pytest.raises(TierError, match="does not match layout"):
        codec.encode(key(1), block(1, LAYOUT_F32))
    with pytest.raises(TierError, match="dtype='int4'"):
        LayoutFingerprint("m", "int4", 1, 1, 1, 1)
    with pytest.raises(TierError, match="head_dim=0"):
        LayoutFingerprint("m", "float32", 1, 1, 0, 1)
    assert LAYOUT.digest != LAYOUT_F32.digest
    assert LAYOUT.digest == LayoutFingerprint("tiny", "bfloat16", 2, 2, 8, 4).digest
    pool = torch.zeros(2, 2, 5, 4, 2, 8, dtype=torch.bfloat16)
    assert LayoutFingerprint.of_pool("tiny", pool) == LAYOUT
