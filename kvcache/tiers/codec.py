"""The byte format of one stored block: a fixed 128-byte header, then the raw tensor bytes.

    offset  size  field
         0     4  magic b"KVCB"
         4     2  format version (1)
         6     2  header size (128)
         8     1  dtype code (``base.DTYPE_CODES``)
         9     3  zero
        12    20  shape: num_layers, 2, block_size, kv_heads, head_dim  (uint32 each)
        32    16  layout digest (``LayoutFingerprint.digest``)
        48    16  block key
        64     8  payload size in bytes
        72     8  payload checksum (xxh3_64, ``hashing.checksum``)
        80    40  zero
       120     8  header checksum (xxh3_64 of bytes 0..119)

All integers little-endian. The payload is the block ``[L, 2, block_size, kv_heads, head_dim]``
in C order, native little-endian element bytes. Decoding only compares numbers and copies bytes:
nothing in a stored block can run code (no pickle), and a block whose header, layout, key, size
or checksum does not match what the reader expects raises ``CorruptBlockError``.

Not here: where the bytes live (the tiers) or what happens after a failed check (they count a
miss and drop the block).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import torch

from kvcache import hashing
from kvcache.errors import CorruptBlockError, TierError
from kvcache.tiers.base import DTYPE_CODES, TierKey

MAGIC = b"KVCB"
VERSION = 1
HEADER_BYTES = 128
_FIELDS = struct.Struct("<4sHHB3x5I16s16sQQ")  # bytes 0..79
_CHECKSUM = struct.Struct("<Q")
_CHECKSUM_AT = HEADER_BYTES - _CHECKSUM.size


@dataclass(frozen=True, slots=True)
class Header:
    payload_nbytes: int
    payload_checksum: int


def tensor_bytes(block: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if block.device.type != "cpu" or not block.is_contiguous():
        raise TierError(
            f"need a contiguous CPU tensor, got device={block.device} contiguous={block.is_contiguous()}"
        )
    array: Any = block.view(torch.uint8).numpy().reshape(-1)
    return memoryview(array)


def encode_header(key: TierKey, payload: memoryview) -> bytes:
    layout = key.layout
    fields = _FIELDS.pack(
        MAGIC,
        VERSION,
        HEADER_BYTES,
        DTYPE_CODES[layout.dtype],
        *(layout.num_layers, 2, layout.block_size, layout.kv_heads, layout.head_dim),
        layout.digest,
        key.key.ljust(16, b"\0")[:16],
        payload.nbytes,
        hashing.checksum(payload),
    )
    head = fields + bytes(_CHECKSUM_AT - len(fields))
    return head + _CHECKSUM.pack(hashing.checksum(head))


def decode_header(header: bytes | bytearray | memoryview, key: TierKey) -> Header:
    """Check a header against the block the reader expects; raise ``CorruptBlockError`` if it differs."""
    if len(header) < HEADER_BYTES:
        raise CorruptBlockError(f"header is {len(header)} bytes, expected {HEADER_BYTES} (truncated)")
    head = memoryview(header)[:HEADER_BYTES]
    (stored_sum,) = _CHECKSUM.unpack_from(head, _CHECKSUM_AT)
    if head[:4] != MAGIC:
        raise CorruptBlockError(f"magic {bytes(head[:4])!r} is not {MAGIC!r}")
    if hashing.checksum(head[:_CHECKSUM_AT]) != stored_sum:
        raise CorruptBlockError("header checksum mismatch")
    _magic, version, size, code, *rest = _FIELDS.unpack_from(head)
    dims, digest, stored_key, nbytes, payload_sum = rest[:5], rest[5], rest[6], rest[7], rest[8]
    if version != VERSION or size != HEADER_BYTES:
        raise CorruptBlockError(f"format version {version} / header size {size}; this reader knows {VERSION}")
    layout = key.layout
    expected_dims = [layout.num_layers, 2, layout.block_size, layout.kv_heads, layout.head_dim]
    if digest != layout.digest or code != DTYPE_CODES[layout.dtype] or list(dims) != expected_dims:
        raise CorruptBlockError(
            f"block was stored for another layout (dtype code {code}, shape {list(dims)}); "
            f"expected {layout.dtype} {expected_dims} of model {layout.model_id!r}"
        )
    if stored_key != key.key.ljust(16, b"\0")[:16]:
        raise CorruptBlockError(f"block holds key {stored_key.hex()}, not {key.key.hex()}")
    if nbytes != layout.block_nbytes:
        raise CorruptBlockError(f"payload size {nbytes} != {layout.block_nbytes} bytes of one block")
    return Header(nbytes, payload_sum)


def verify_payload(header: Header, payload: memoryview) -> None:
    if payload.nbytes != header.payload_nbytes:
        raise CorruptBlockError(f"payload is {payload.nbytes} bytes, header says {header.payload_nbytes}")
    if hashing.checksum(payload) != header.payload_checksum:
        raise CorruptBlockError("payload checksum mismatch")


def encode(key: TierKey, block: torch.Tensor) -> bytes:
    """Header and payload as one bytes object (for tiers that store values, such as Redis)."""
    key.layout.check_block(block)
    payload = tensor_bytes(block.contiguous())
    return encode_header(key, payload) + payload.tobytes()


def decode(
    data: bytes | bytearray | memoryview, key: TierKey, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The verified block in ``data``, copied into ``out`` (or a new tensor)."""
    header = decode_header(data, key)
    payload = memoryview(data)[HEADER_BYTES:]
    verify_payload(header, payload)
    if out is None:
        out = torch.empty(key.layout.block_shape, dtype=key.layout.torch_dtype)
    else:
        key.layout.check_block(out)
    tensor_bytes(out)[:] = payload
    return out
