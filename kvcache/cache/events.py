"""Events a block manager emits when blocks become reusable or stop being so.

The router and the spill tiers learn what a worker caches only from these records, never by
reading the manager's internals. Records are small frozen dataclasses with the 16-byte block
key; ``parent_key`` lets a consumer rebuild prefix chains.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockStored:
    key: bytes
    parent_key: bytes
    block_id: int
    scope: str


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    key: bytes
    block_id: int
    scope: str


CacheEvent = BlockStored | BlockRemoved
