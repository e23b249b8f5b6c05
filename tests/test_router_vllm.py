"""vLLM compatibility: block keys against vectors encoded by hand from the documented algorithm
(canonical CBOR per RFC 8949, then SHA-256 or XXH3-128), and the KV event stream (schema,
sequence numbers, replay after a gap, AllBlocksCleared, the capacity bound of the router's index)
over loopback ZMQ."""

from __future__ import annotations

import hashlib
import socket
import time

import msgspec
import pytest
import xxhash

from kvcache import ConfigError
from kvcache.router.index import IndexChange, PreciseIndex
from kvcache.vllm.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventPublisher,
    EventStreamError,
    KVEventBatch,
    decode_batch,
    encode_batch,
    index_key,
)
from kvcache.vllm.keys import VllmKeyer, external_key
from kvcache.vllm.subscriber import EventSubscriber, apply_batch


def cbor_block(parent: bytes, tokens: bytes, extra: bytes) -> bytes:
    """array(3) [bytes(32) parent, <tokens array>, <extra>], each part already CBOR."""
    return bytes([0x83, 0x58, 0x20]) + parent + tokens + extra


NONE_SEED_0 = hashlib.sha256(bytes([0x61, 0x30])).digest()  # H(text "0")
TOKENS_1234 = bytes([0x84, 1, 2, 3, 4])  # array(4) of small uints
TOKENS_1000 = bytes([0x84, 0x19, 0x03, 0xE8, 0x18, 0x18, 0x00, 0x17])  # 1000, 24, 0, 23
NULL = bytes([0xF6])


def test_sha256_cbor_chain() -> None:
    keyer = VllmKeyer(block_size=4, hash_name="sha256_cbor", seed="0")
    assert keyer.none_hash == NONE_SEED_0
    k0 = hashlib.sha256(cbor_block(NONE_SEED_0, TOKENS_1234, NULL)).digest()
    k1 = hashlib.sha256(cbor_block(k0, TOKENS_1000, NULL)).digest()
    # the partial third block (5 tokens past 8) has no key
    assert keyer.block_hashes([1, 2, 3, 4, 1000, 24, 0, 23, 9]) == [k0, k1]
    assert keyer.keys([1, 2, 3, 4]) == [int.from_bytes(k0, "big") & (2**64 - 1)]


def test_extra_keys_lora_every_block_salt_block_zero() -> None:
    keyer = VllmKeyer(block_size=4, seed="0")
    lora_salt = bytes([0x82, 0x66]) + b"lora-a" + bytes([0x64]) + b"salt"  # ("lora-a", "salt")
    lora = bytes([0x81, 0x66]) + b"lora-a"  # ("lora-a",)
    k0 = hashlib.sha256(cbor_block(NONE_SEED_0, TOKENS_1234, lora_salt)).digest()
    k1 = hashlib.sha256(cbor_block(k0, TOKENS_1000, lora)).digest()
    assert keyer.block_hashes([1, 2, 3, 4, 1000, 24, 0, 23], "lora-a", "salt") == [k0, k1]
    salt_only = bytes([0x81, 0x64]) + b"salt"
    s0 = hashlib.sha256(cbor_block(NONE_SEED_0, TOKENS_1234, salt_only)).digest()
    s1 = hashlib.sha256(cbor_block(s0, TOKENS_1000, NULL)).digest()
    assert keyer.block_hashes([1, 2, 3, 4, 1000, 24, 0, 23], cache_salt="salt") == [s0, s1]


def test_xxhash_cbor_and_seed() -> None:
    keyer = VllmKeyer(block_size=4, hash_name="xxhash_cbor", seed="42")
    none = xxhash.xxh3_128_digest(bytes([0x62]) + b"42")
    assert keyer.none_hash == none
    k0 = xxhash.xxh3_128_digest(bytes([0x83, 0x50]) + none + TOKENS_1234 + NULL)  # bytes(16) parent
    assert keyer.block_hashes([1, 2, 3, 4]) == [k0]
    assert VllmKeyer(4, seed="0").keys([1, 2, 3, 4]) != VllmKeyer(4, seed="1").keys([1, 2, 3, 4])
    with pytest.raises(ConfigError, match="hash_name='sha256'"):
        VllmKeyer(hash_name="sha256")
    with pytest.raises(ConfigError, match="block_size=0"):
        VllmKeyer(block_size=0)


def test_external_key_forms_agree() -> None:
    digest = bytes(range(32))
    assert external_key(digest) == int.from_bytes(digest[-8:], "big")
    assert external_key(int.from_bytes(digest[-8:], "big")) == external_key(digest)


def test_decode_schema() -> None:
    # A batch as vLLM encodes it: tagged arrays, the trailing lora_name omitted by older engines.
    raw = msgspec.msgpack.encode(
        [
            1.5,
            [
                ["BlockStored", [11, 12], None, [1, 2, 3, 4, 5, 6, 7, 8], 4, None, "GPU"],
                ["BlockRemoved", [11], "GPU"],
            ],
        ]
    )
    batch = decode_batch(raw)
    assert batch.ts == 1.5
    assert batch.events == [
        BlockStored([11, 12], None, [1, 2, 3, 4, 5, 6, 7, 8], 4, None, "GPU"),
        BlockRemoved([11], "GPU"),
    ]
    # fields a newer engine appends are ignored
    newer = msgspec.msgpack.encode([2.0, [["AllBlocksCleared"]], 0, "extra"])
    assert decode_batch(newer).events == [AllBlocksCleared()]
    assert decode_batch(encode_batch(batch)) == batch
    with pytest.raises(EventStreamError, match="not a KVEventBatch"):
        decode_batch(msgspec.msgpack.encode([1.0, [["BlockEvicted", [1]]]]))


def vkeys(*keys: int) -> list[bytes]:
    return [index_key(k) for k in keys]


def test_batches_enter_the_routers_index_bounded_and_cleared() -> None:
    index = PreciseIndex(capacity_blocks=3)
    change = apply_batch(index, "a", KVEventBatch(0.0, [BlockStored([1, 2, 3, 4], None, [], 4, None, None)]))
    assert change == IndexChange(gained=vkeys(1, 2, 3, 4), lost=vkeys(1))  # 1 forgotten first
    assert index.num_keys("a") == 3 and index.overlap("a", vkeys(2, 3, 4)) == 3
    change = apply_batch(index, "a", KVEventBatch(0.0, [BlockRemoved([3, 99], None)]))
    assert change == IndexChange(gained=[], lost=vkeys(3))  # 99 was never held
    assert index.overlap("a", vkeys(2, 3, 4)) == 1
    digest = bytes(24) + (2).to_bytes(8, "big")  # a key sent as digest bytes, not as an int
    apply_batch(index, "b", KVEventBatch(0.0, [BlockStored([digest], None, [], 4, None, None)]))
    assert index.overlaps(vkeys(2), 0.0) == {"a": 1, "b": 1}
    with pytest.raises(EventStreamError, match="AllBlocksCleared"):  # a subscriber's reset instead
        apply_batch(index, "a", KVEventBatch(0.0, [AllBlocksCleared()]))
    assert index.clear("a") == vkeys(2, 4)  # what a reset does, oldest first
    assert index.num_keys("a") == 0 and index.overlaps(vkeys(2), 0.0) == {"b": 1}
    assert set(index.holders) == set(vkeys(2))
    index.check()


def _ports() -> tuple[int, int]:
    found = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            found.append(s.getsockname()[1])
    return found[0], found[1]


def _drain(sub: EventSubscriber, want: int) -> None:
    deadline = time.monotonic() + 10.0
    while sub.next_seq != want:
        sub.poll(100)
        assert time.monotonic() < deadline, f"stuck at seq {sub.next_seq}, want {want}"


def test_gap_is_replayed_then_resync_when_buffer_moved_on() -> None:
    pub_port, replay_port = _ports()
    pub = EventPublisher(f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{replay_port}", buffer_steps=2)
    index = PreciseIndex(capacity_blocks=100)
    sub = EventSubscriber("e0", index, f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{replay_port}")
    try:
        # PUB/SUB joins asynchronously: publish until the first message arrives.
        deadline = time.monotonic() + 10.0
        while sub.next_seq is None:
            pub.publish([BlockStored([1], None, [], 4, None, None)])
            sub.poll(50)
            assert time.monotonic() < deadline
        first = pub.seq
        _drain(sub, first)
        pub.publish([BlockStored([2], None, [], 4, None, None)], send=False)  # lost on the wire
        pub.publish([BlockStored([3], None, [], 4, None, None)])
        _drain(sub, first + 2)
        assert sub.num_gaps == 1 and sub.num_resyncs == 0
        assert index.overlap("e0", vkeys(1, 2, 3)) == 3  # the lost batch came back by replay
        for k in (4, 5, 6):  # three lost: the 2-batch buffer no longer holds the first
            pub.publish([BlockStored([k], None, [], 4, None, None)], send=False)
        pub.publish([BlockStored([7], None, [], 4, None, None)])
        _drain(sub, first + 6)
        assert sub.num_gaps == 2 and sub.num_resyncs == 1
        assert index.overlap("e0", vkeys(1)) == 0 and index.overlap("e0", vkeys(7)) == 1  # resynced
    finally:
        sub.close()
        pub.close()
