"""A re-implementation of vLLM v1's prefix-caching block pool: the baseline kvcache is measured against.

Written from the algorithm vLLM documents in its v1 core (``vllm/v1/core/block_pool.py``,
``vllm/v1/core/kv_cache_utils.py``, ``vllm/v1/core/kv_cache_manager.py`` and
``vllm/v1/core/single_type_kv_cache_manager.py``), keeping every step its request path takes for a
single full-attention KV-cache group, so the benchmark needs no vLLM install:

- block hashes (``hash_block_tokens``): ``sha256(pickle.dumps((parent or NONE_HASH,
  tuple(block_tokens), extra_keys), HIGHEST_PROTOCOL))``, computed when a request arrives for every
  full block; ``cache_salt`` enters block 0's extra keys only; ``NONE_HASH`` comes from a fixed seed;
- the pool keys its index by hash + a 4-byte group id (``make_block_hash_with_group_id``) and keeps
  a duplicate block under the same hash (a dict of blocks per hash), never refusing one;
- a doubly linked free queue over the block objects with fake head and tail (LRU: allocation pops
  from the head, a freed request's blocks go to the tail in reverse order, a hit removes a block
  from the middle); block 0 is the null block and never handed out;
- ``get_computed_blocks``: the longest run of cached block hashes, capped at ``num_tokens - 1``
  tokens; ``allocate_slots``: returns None when the new blocks plus the evictable hits exceed the
  free count, else touches the hits, pops new blocks (evicting their old hashes) and caches every
  full block; ``free``: drops one reference per block, tail first.

Not modelled: multiple KV-cache groups, sliding windows, speculative lookahead, preemption,
metrics objects. Events are off, as in vLLM's default.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Hashable, Sequence
from typing import Any


def sha256_pickle(value: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


NONE_HASH = sha256_pickle("kvcache-bench-fixed-seed")


def hash_request(tokens: Sequence[int], block_size: int, cache_salt: str | None = None) -> list[bytes]:
    """The block hashes vLLM computes for a new request: one per full block, chained."""
    hashes: list[bytes] = []
    parent = NONE_HASH
    for start in range(0, len(tokens) - block_size + 1, block_size):
        extra = (cache_salt,) if cache_salt is not None and start == 0 else None
        parent = sha256_pickle((parent, tuple(tokens[start : start + block_size]), extra))
        hashes.append(parent)
    return hashes


class VBlock:
    __slots__ = ("block_hash", "block_id", "next_free_block", "prev_free_block", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        self.prev_free_block: VBlock | None = None
        self.next_free_block: VBlock | None = None


class FreeQueue:
    """Doubly linked list of free blocks with fake head and tail (O(1) popleft, remove, append)."""

    def __init__(self, blocks: list[VBlock]) -> None:
        self.num_free_blocks = len(blocks)
        self.head = VBlock(-1)
        self.tail = VBlock(-1)
        for prev, nxt in zip([self.head, *blocks], [*blocks, self.tail], strict=True):
            prev.next_free_block = nxt
            nxt.prev_free_block = prev

    def popleft(self) -> VBlock:
        first = self.head.next_free_block
        assert first is not None and first is not self.tail
        self.remove(first)
        return first

    def popleft_n(self, n: int) -> list[VBlock]:
        assert n <= self.num_free_blocks
        out: list[VBlock] = []
        cur = self.head.next_free_block
        for _ in range(n):
            assert cur is not None
            out.append(cur)
            nxt = cur.next_free_block
            cur.prev_free_block = cur.next_free_block = None
            cur = nxt
        self.head.next_free_block = cur
        assert cur is not None
        cur.prev_free_block = self.head
        self.num_free_blocks -= n
        return out

    def remove(self, block: VBlock) -> None:
        prev, nxt = block.prev_free_block, block.next_free_block
        assert prev is not None and nxt is not None
        prev.next_free_block = nxt
        nxt.prev_free_block = prev
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append_n(self, blocks: list[VBlock]) -> None:
        if not blocks:
            return
        last = self.tail.prev_free_block
        assert last is not None
        for block in blocks:
            block.prev_free_block = last
            last.next_free_block = block
            last = block
        last.next_free_block = self.tail
        self.tail.prev_free_block = last
        self.num_free_blocks += len(blocks)


class BlockHashToBlockMap:
    """hash -> one block, or -> {block_id: block} once a duplicate was cached."""

    def __init__(self) -> None:
        self._cache: dict[bytes, VBlock | dict[int, VBlock]] = {}

    def get_one_block(self, key: bytes) -> VBlock | None:
        blocks = self._cache.get(key)
        if blocks is None:
            return None
        if isinstance(blocks, VBlock):
            return blocks
        return next(iter(blocks.values()))

    def insert(self, key: bytes, block: VBlock) -> None:
        blocks = self._cache.get(key)
        if blocks is None:
            self._cache[key] = block
        elif isinstance(blocks, VBlock):
            self._cache[key] = {blocks.block_id: blocks, block.block_id: block}
        else:
            blocks[block.block_id] = block

    def pop(self, key: bytes, block_id: int) -> VBlock | None:
        blocks = self._cache.pop(key, None)
        if blocks is None:
            return None
        if isinstance(blocks, VBlock):
            if blocks.block_id == block_id:
                return blocks
            self._cache[key] = blocks
            return None
        block = blocks.pop(block_id, None)
        if blocks:
            self._cache[key] = blocks
        return block


def with_group_id(block_hash: bytes, group_id: int) -> bytes:
    return block_hash + group_id.to_bytes(4, "big", signed=False)


class VllmBlockPool:
    def __init__(self, num_gpu_blocks: int) -> None:
        self.blocks = [VBlock(i) for i in range(num_gpu_blocks)]
        self.free_block_queue = FreeQueue(self.blocks)
        self.cached_block_hash_to_block = BlockHashToBlockMap()
        self.null_block = self.free_block_queue.popleft()

    def get_num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    def get_cached_block(self, block_hash: bytes, group_ids: list[int]) -> list[VBlock] | None:
        cached: list[VBlock] = []
        for group_id in group_ids:
            block = self.cached_block_hash_to_block.get_one_block(with_group_id(block_hash, group_id))
            if block is None:
                return None
            cached.append(block)
        return cached

    def get_new_blocks(self, num_blocks: int) -> list[VBlock]:
        if num_blocks > self.get_num_free_blocks():
            raise ValueError(f"Cannot get {num_blocks} free blocks from the pool")
        ret = self.free_block_queue.popleft_n(num_blocks)
        for block in ret:
            self._maybe_evict_cached_block(block)
            assert block.ref_cnt == 0
            block.ref_cnt += 1
        return ret

    def _maybe_evict_cached_block(self, block: VBlock) -> bool:
        block_hash = block.block_hash
        if block_hash is None:
            return False
        if self.cached_block_hash_to_block.pop(block_hash, block.block_id) is None:
            return False
        block.block_hash = None
        return True

    def touch(self, blocks: list[VBlock]) -> None:
        for block in blocks:
            if block.ref_cnt == 0 and block is not self.null_block:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: list[VBlock]) -> None:
        for block in ordered_blocks:
            block.ref_cnt -= 1
        self.free_block_queue.append_n(
            [b for b in ordered_blocks if b.ref_cnt == 0 and b is not self.null_block]
        )

    def cache_full_blocks(
        self,
        blocks: list[VBlock],
        block_hashes: list[bytes],
        num_cached_blocks: int,
        num_full_blocks: int,
        group_id: int,
    ) -> None:
        if num_cached_blocks >= num_full_blocks:
            return
        new_hashes = block_hashes[num_cached_blocks:num_full_blocks]
        for i, blk in enumerate(blocks[num_cached_blocks:num_full_blocks]):
            if blk is self.null_block:
                continue
            assert blk.block_hash is None
            key = with_group_id(new_hashes[i], group_id)
            blk.block_hash = key
            self.cached_block_hash_to_block.insert(key, blk)


class VllmKVCacheManager:
    """The request-level calls of vLLM's ``KVCacheManager`` for one full-attention group."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        # +1: vLLM reserves block 0 as the null block, so both sides get ``num_blocks`` usable.
        self.block_pool = VllmBlockPool(num_blocks + 1)
        self.block_size = block_size
        self.group_ids = [0]
        self.req_to_blocks: dict[Hashable, list[VBlock]] = {}
        self.num_cached_block: dict[Hashable, int] = {}
        self.queries = 0
        self.hits = 0

    def get_computed_blocks(self, block_hashes: list[bytes], num_tokens: int) -> list[VBlock]:
        max_num_blocks = (num_tokens - 1) // self.block_size
        computed: list[VBlock] = []
        pool = self.block_pool
        for block_hash in block_hashes[:max_num_blocks]:
            cached = pool.get_cached_block(block_hash, self.group_ids)
            if cached is None:
                break
            computed.append(cached[0])
        return computed

    def allocate_slots(
        self, request_id: Hashable, block_hashes: list[bytes], num_tokens: int, computed: list[VBlock]
    ) -> list[VBlock] | None:
        pool = self.block_pool
        req_blocks = self.req_to_blocks.get(request_id, [])
        num_required = -(-num_tokens // self.block_size)
        num_new = num_required - len(computed) - len(req_blocks)
        num_evictable = sum(1 for b in computed if b.ref_cnt == 0 and b is not pool.null_block)
        if num_new + num_evictable > pool.get_num_free_blocks():
            return None
        pool.touch(computed)
        req_blocks = self.req_to_blocks.setdefault(request_id, [])
        req_blocks.extend(computed)
        self.num_cached_block[request_id] = len(computed)
        req_blocks.extend(pool.get_new_blocks(num_new))
        # Prefill writes every prompt token: cache each full block.
        num_full = num_tokens // self.block_size
        pool.cache_full_blocks(req_blocks, block_hashes, self.num_cached_block[request_id], num_full, 0)
        self.num_cached_block[request_id] = num_full
        self.queries += num_tokens
        self.hits += len(computed) * self.block_size
        return req_blocks

    def free(self, request_id: Hashable) -> None:
        blocks = self.req_to_blocks.pop(request_id)
        self.num_cached_block.pop(request_id, None)
        self.block_pool.free_blocks(list(reversed(blocks)))
