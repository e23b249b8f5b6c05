"""Canonical event encoding: round trips, and rejects anything malformed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcache.cache.events import BlockRemoved, BlockStored, CacheEvent
from kvcache.errors import ProtocolError
from kvcache.serve.wire import decode_events, encode_events

keys = st.binary(min_size=16, max_size=16)
scopes = st.text(max_size=40)
events = st.one_of(
    st.builds(BlockStored, keys, keys, st.integers(0, 2**32 - 1), scopes),
    st.builds(BlockRemoved, keys, st.integers(0, 2**32 - 1), scopes),
)


@given(st.lists(events, max_size=20))
def test_round_trip(batch: list[CacheEvent]) -> None:
    assert decode_events(encode_events(batch)) == batch


def test_exact_bytes() -> None:
    data = encode_events([BlockStored(b"k" * 16, b"p" * 16, 7, "tenant:a"), BlockRemoved(b"k" * 16, 7, "")])
    stored = b"\x01" + b"k" * 16 + b"p" * 16 + b"\x07\x00\x00\x00\x08\x00" + b"tenant:a"
    removed = b"\x02" + b"k" * 16 + b"\x07\x00\x00\x00\x00\x00"
    assert data == b"KVEV\x01\x02\x00\x00\x00" + stored + removed


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"KV", "shorter than"),
        (b"PKL!\x01\x00\x00\x00\x00", "expected b'KVEV'"),
        (b"KVEV\x01\x01\x00\x00\x00", "after 0 of 1"),
        (b"KVEV\x01\x01\x00\x00\x00\x09", "unknown event tag 9"),
        (b"KVEV\x01\x01\x00\x00\x00\x02" + b"k" * 10, "truncated"),
        (b"KVEV\x01\x01\x00\x00\x00\x02" + b"k" * 16 + b"\x00\x00\x00\x00\x05\x00ab", "runs past"),
        (b"KVEV\x01\x00\x00\x00\x00!", "1 trailing bytes"),
    ],
)
def test_malformed_batches(data: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_events(data)
    assert needle in str(info.value)
