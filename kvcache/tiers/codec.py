"""The byte format of one stored block: a fixed 128-byte header, then the raw tensor bytes.

    offset  size  field
         0     4  magic b"KVCB"
         4     2  format version (2)
         6     2  header size (128)
         8     1  dtype code (``base.DTYPE_CODES``)
         9     1  seal kind (``seal.CHECKSUM`` = 1, ``seal.KEYED_BLAKE3`` = 2)
        10     2  zero
        12    20  shape: num_layers, 2, block_size, kv_heads, head_dim  (uint32 each)
        32    16  layout digest (``LayoutFingerprint.digest``, weights identity included)
        48    16  block key
        64     8  payload size in bytes
        72    32  tag (``Seal.tag``): the payload's xxh3_64 then zeros, or a keyed BLAKE3 MAC
                  over bytes 0..71 and the payload
       104    16  zero
       120     8  header checksum (xxh3_64 of bytes 0..119: catches a torn header early; the
                  MAC, not this, is what authenticates)

All integers little-endian. The payload is the block ``[L, 2, block_size, kv_heads, head_dim]``
in C order, native little-endian element bytes. Decoding only compares numbers and copies bytes:
nothing in a stored block can run code (no pickle), and a block whose header, layout, key, size,
seal kind or tag does not match what the reader expects raises ``CorruptBlockError``. A reader
with a keyed seal refuses checksum-sealed blocks (no downgrade), and blocks of format version 1
(before the seal and the weights identity) are refused like any damaged block: a counted miss.

Not here: where the bytes live (the tiers), how the secret is provisioned (``seal``), or what
happens after a failed check (the tiers count a miss and drop the block).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import torch

from kvcache.cache import hashing
from kvcache.errors import CorruptBlockError, TierError
from kvcache.tiers.base import DTYPE_CODES, TierKey
from kvcache.tiers.seal import KINDS, TAG_BYTES, Seal

MAGIC = b"KVCB"
VERSION = 2
HEADER_BYTES = 128
_FIELDS = struct.Struct("<4sHHBB2x5I16s16sQ")  # bytes 0..71: what the keyed tag covers
_TAG_AT = _FIELDS.size
_CHECKSUM = struct.Struct("<Q")
_CHECKSUM_AT = HEADER_BYTES - _CHECKSUM.size
CHECKSUM_SEAL = Seal.checksum()


@dataclass(frozen=True, slots=True)
class Header:
    payload_nbytes: int
    tag: bytes


def tensor_bytes(block: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if block.device.type != "cpu" or not block.is_contiguous():
        raise TierError(
            f"need a contiguous CPU tensor, got device={block.device} contiguous={block.is_contiguous()}"
        )
    array: Any = block.view(torch.uint8).numpy().reshape(-1)
    return memoryview(array)


def encode_header(key: TierKey, payload: memoryview, seal: Seal = CHECKSUM_SEAL) -> bytes:
    layout = key.layout
    fields = _FIELDS.pack(
        MAGIC,
        VERSION,
        HEADER_BYTES,
        DTYPE_CODES[layout.dtype],
        seal.kind,
        *(layout.num_layers, 2, layout.block_size, layout.kv_heads, layout.head_dim),
        layout.digest,
        key.key.ljust(16, b"\0")[:16],
        payload.nbytes,
    )
    head = fields + seal.tag(fields, payload)
    head += bytes(_CHECKSUM_AT - len(head))
    return head + _CHECKSUM.pack(hashing.checksum(head))


def decode_header(header: bytes | bytearray | memoryview, key: TierKey, seal: Seal = CHECKSUM_SEAL) -> Header:
    """Check a header against the block the reader expects; raise ``CorruptBlockError`` if it differs."""
    if len(header) < HEADER_BYTES:
        raise CorruptBlockError(f"header is {len(header)} bytes, expected {HEADER_BYTES} (truncated)")
    head = memoryview(header)[:HEADER_BYTES]
    (stored_sum,) = _CHECKSUM.unpack_from(head, _CHECKSUM_AT)
    if head[:4] != MAGIC:
        raise CorruptBlockError(f"magic {bytes(head[:4])!r} is not {MAGIC!r}")
    if hashing.checksum(head[:_CHECKSUM_AT]) != stored_sum:
        raise CorruptBlockError("header checksum mismatch")
    (version, size) = struct.unpack_from("<HH", head, 4)
    if version != VERSION or size != HEADER_BYTES:
        raise CorruptBlockError(f"format version {version} / header size {size}; this reader knows {VERSION}")
    _magic, _version, _size, code, kind, *rest = _FIELDS.unpack_from(head)
    dims, digest, stored_key, nbytes = rest[:5], rest[5], rest[6], rest[7]
    if kind != seal.kind:
        raise CorruptBlockError(
            f"block is sealed with {KINDS.get(kind, f'unknown seal {kind}')}; this tier requires {seal.name}"
        )
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
    return Header(nbytes, bytes(head[_TAG_AT : _TAG_AT + TAG_BYTES]))


def verify(
    header: bytes | bytearray | memoryview, payload: memoryview, key: TierKey, seal: Seal = CHECKSUM_SEAL
) -> None:
    """Raise ``CorruptBlockError`` unless ``header`` and ``payload`` are the block of ``key``
    sealed with ``seal``."""
    checked = decode_header(header, key, seal)
    if payload.nbytes != checked.payload_nbytes:
        raise CorruptBlockError(f"payload is {payload.nbytes} bytes, header says {checked.payload_nbytes}")
    if not seal.check(checked.tag, memoryview(header)[:_TAG_AT], payload):
        what = "MAC" if seal.authenticated else "checksum"
        raise CorruptBlockError(f"payload {what} mismatch")


def encode(key: TierKey, block: torch.Tensor, seal: Seal = CHECKSUM_SEAL) -> bytes:
    """Header and payload as one bytes object (for tiers that store values, such as Redis)."""
    key.layout.check_block(block)
    payload = tensor_bytes(block.contiguous())
    return encode_header(key, payload, seal) + payload.tobytes()


def decode(
    data: bytes | bytearray | memoryview,
    key: TierKey,
    out: torch.Tensor | None = None,
    seal: Seal = CHECKSUM_SEAL,
) -> torch.Tensor:
    """The verified block in ``data``, copied into ``out`` (or a new tensor)."""
    payload = memoryview(data)[HEADER_BYTES:]
    verify(data, payload, key, seal)
    if out is None:
        out = torch.empty(key.layout.block_shape, dtype=key.layout.torch_dtype)
    else:
        key.layout.check_block(out)
    tensor_bytes(out)[:] = payload
    return out
