"""The block manager: the one object callers use to cache, share and evict KV blocks.

    manager = BlockManager(CacheConfig(num_blocks=1024))
    alloc = manager.allocate("req-1", tokens, Scope("acme"))   # reuse the cached prefix
    ...                                                         # compute tokens[alloc.num_cached_tokens:]
    manager.append("req-1", [next_token])                       # decode growth
    manager.free("req-1")                                       # blocks stay cached until evicted

Every call validates its input before it changes anything, so a call that raises leaves the
manager exactly as it was. Hits are confirmed against what the block stores (parent key, scope
and content bytes), so even a crafted 128-bit key collision is a miss, never another prompt's KV.

Not here: computing KV (``hf``), moving blocks between memory tiers (``tiers``), placing
requests on workers (``kvcache.router``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Container, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from kvcache.cache import eviction, hashing
from kvcache.cache.block_pool import Block, BlockPool
from kvcache.cache.config import CacheConfig
from kvcache.cache.events import CacheEvent
from kvcache.cache.hashing import KIND_BLOCK_IDS, KIND_TOKENS, TOKEN_BYTES, Hasher
from kvcache.cache.stats import CacheStats, TenantStats
from kvcache.cache.tenancy import PUBLIC_SCOPE, Scope, as_scope
from kvcache.errors import CapacityError, InvalidTokensError, RequestError

Tokens = Sequence[int] | np.ndarray  # token ids: a list/tuple of ints or a 1-D integer array


@dataclass(slots=True)
class Prompt:
    """A prompt's block keys in one scope: computed once, usable for lookup and allocate.

    ``keys[i]`` is the key of full block ``i`` and ``contents[i]`` its encoded tokens (or id);
    blocks ``< num_public_blocks`` are keyed in the public scope, the rest in
    ``scope.chain_scope``. It holds its own copy of the tokens, never the caller's list, so a
    list changed after hashing changes nothing. Valid until the next ``publish`` (a stale prompt
    is re-hashed by the manager from that copy).
    """

    scope: Scope
    kind: str
    num_tokens: int
    keys: list[bytes]
    contents: list[bytes]
    raw: bytes  # encoded content of the full blocks, ``width`` bytes each
    width: int
    root: bytes  # parent of block 0
    private_parent: bytes  # parent of block ``num_public_blocks``
    num_public_blocks: int
    tail_raw: bytes  # the partial last block, encoded (token prompts only)
    epoch: int

    @property
    def tail_tokens(self) -> list[int]:
        return np.frombuffer(self.tail_raw, dtype="<u4").tolist()  # type: ignore[no-any-return]

    @property
    def tokens(self) -> list[int] | None:
        """The prompt's token ids (a fresh list), or None for a prompt hashed from block ids."""
        if self.kind != KIND_TOKENS:
            return None
        return np.frombuffer(self.raw + self.tail_raw, dtype="<u4").tolist()  # type: ignore[no-any-return]

    def content(self, i: int) -> bytes:
        return self.contents[i]

    def parent_of(self, i: int) -> bytes:
        if i == self.num_public_blocks:
            return self.private_parent
        return self.keys[i - 1] if i else self.root

    def parents(self, start: int, stop: int) -> list[bytes]:
        """``parent_of(i)`` for ``start <= i < stop`` in one list."""
        if start >= stop:
            return []
        return [self.parent_of(start), *self.keys[start : stop - 1]]

    def scope_of(self, i: int) -> str:
        return PUBLIC_SCOPE if i < self.num_public_blocks else self.scope.chain_scope


@dataclass(frozen=True, slots=True)
class Allocation:
    """What ``allocate`` reserved: block ids for the whole prompt, and how much of it is cached.

    The caller computes KV for tokens ``num_cached_tokens:`` only; the first
    ``num_cached_tokens // block_size`` blocks already hold the prefix.
    """

    request_id: Hashable
    block_ids: list[int]
    num_cached_tokens: int
    num_tokens: int


@dataclass(slots=True)
class _Request:
    scope: Scope
    kind: str
    block_ids: list[int]
    num_tokens: int
    next_parent: bytes  # parent key of the next block to fill
    tail_raw: bytes  # encoded tokens of the partial last block
    num_hit_blocks: int = 0  # leading blocks reused from the cache; the rest were taken fresh


class BlockManager:
    """Prefix-hash block manager with tenant isolation, k-anonymous sharing and quotas."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        self._has_quotas = bool(config.quotas) or config.default_quota != type(config.default_quota)()
        self.pool = BlockPool(config.num_blocks, max_events=config.max_events, track_owners=self._has_quotas)
        self.hasher = Hasher(
            block_size=config.block_size,
            model_id=config.model_id,
            adapter_id=config.adapter_id,
            deployment_key=config.deployment_key,
        )
        self._published: hashing.Published = {}
        self._epoch = 0
        self._requests: dict[Hashable, _Request] = {}
        self._tenants: dict[str, TenantStats] = {}
        # The last refusal for room (``wait``): request id, the caller's prompt object, the pool's
        # room version, epoch. While none of them moved, asking again gets the same None at once.
        self._refused: tuple[Hashable, Prompt | Tokens, int, int] | None = None

    # ---- hashing -------------------------------------------------------------------------

    def hash(self, tokens: Tokens, scope: Scope | str | None = None) -> Prompt:
        """Key every full block of ``tokens`` in ``scope``, through any published public prefix.

        ``tokens``: a list/tuple of ints or a 1-D integer array (numpy, CPU torch); see
        ``hashing.tokens_to_bytes`` for what is rejected.
        """
        scope = as_scope(scope)
        return self._hash_encoded(hashing.tokens_to_bytes(tokens, self.config.vocab_size), scope)

    def _hash_encoded(self, raw: bytes, scope: Scope) -> Prompt:
        width = self.block_size * TOKEN_BYTES
        num_tokens = len(raw) // TOKEN_BYTES
        num_full = num_tokens // self.block_size
        keyed = hashing.key_prompt(self.hasher, raw, scope.chain_scope, self._published)
        return Prompt(
            scope=scope,
            kind=KIND_TOKENS,
            num_tokens=num_tokens,
            keys=keyed.keys,
            contents=keyed.contents,
            raw=raw[: num_full * width],
            width=width,
            root=keyed.root,
            private_parent=keyed.private_parent,
            num_public_blocks=keyed.num_public_blocks,
            tail_raw=raw[num_full * width :],
            epoch=self._epoch,
        )

    def hash_block_ids(
        self, block_ids: Sequence[int] | np.ndarray, num_tokens: int, scope: Scope | str | None = None
    ) -> Prompt:
        """Key a prompt given as precomputed per-block ids (one id per ``block_size`` tokens, the
        last block possibly partial), as in Mooncake traces' ``hash_ids``."""
        scope = as_scope(scope)
        bs = self.block_size
        if isinstance(num_tokens, (bool, np.bool_)) or not isinstance(num_tokens, (int, np.integer)):
            raise InvalidTokensError(f"num_tokens={num_tokens!r} must be an int")
        num_tokens = int(num_tokens)
        expected = -(-num_tokens // bs)
        if num_tokens <= 0 or len(block_ids) != expected:
            raise InvalidTokensError(
                f"{len(block_ids)} block ids for num_tokens={num_tokens}; expected "
                f"ceil({num_tokens}/{bs}) = {expected} ids and num_tokens > 0"
            )
        raw = hashing.block_ids_to_bytes(block_ids)
        num_full = num_tokens // bs
        root = self.hasher.root(scope.chain_scope, KIND_BLOCK_IDS)
        width = hashing.BLOCK_ID_BYTES
        raw = raw[: num_full * width]
        keys, contents = hashing.chain_blocks(root, raw, width)
        return Prompt(
            scope, KIND_BLOCK_IDS, num_tokens, keys, contents, raw, width, root, root, 0, b"", self._epoch
        )

    def extend(self, prompt: Prompt, tokens: Tokens) -> Prompt:
        """``prompt`` followed by ``tokens``, keyed on from where it left off: the blocks they fill
        continue its chain in its scope, exactly as ``append`` keys a running request's blocks,
        so a request that must be admitted again (preempted) keeps its keys and hits the blocks
        it cached instead of hashing its whole prompt again."""
        if prompt.kind != KIND_TOKENS:
            raise InvalidTokensError("a prompt hashed from block ids cannot be extended by tokens")
        if len(tokens) == 0:
            return prompt
        raw = hashing.tokens_to_bytes(tokens, self.config.vocab_size)
        width = prompt.width
        tail = prompt.tail_raw + raw
        full = tail[: len(tail) - len(tail) % width]
        keys, contents = prompt.keys, prompt.contents
        if full:
            more_keys, more_contents = hashing.chain_blocks(prompt.parent_of(len(keys)), full, width)
            keys, contents = keys + more_keys, contents + more_contents
        return Prompt(
            scope=prompt.scope,
            kind=KIND_TOKENS,
            num_tokens=prompt.num_tokens + len(raw) // TOKEN_BYTES,
            keys=keys,
            contents=contents,
            raw=prompt.raw + full,
            width=width,
            root=prompt.root,
            private_parent=prompt.private_parent,
            num_public_blocks=prompt.num_public_blocks,
            tail_raw=tail[len(full) :],
            epoch=prompt.epoch,
        )

    def extend_unkeyed(self, prompt: Prompt, num_tokens: int) -> Prompt:
        """``prompt`` (hashed from block ids) followed by ``num_tokens`` whose content is unknown (a
        replayed trace's outputs): the same keys, more tokens. A block-id prompt's partial last
        block and what follows it have no content to key, so they are never cached or shared."""
        if prompt.kind != KIND_BLOCK_IDS:
            raise InvalidTokensError("a prompt hashed from tokens is extended by its tokens (extend)")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise InvalidTokensError(f"num_tokens={num_tokens!r} must be an int >= 0")
        return dataclasses.replace(prompt, num_tokens=prompt.num_tokens + num_tokens)

    def publish(self, tokens: Tokens) -> int:
        """Publish a prefix (e.g. a system prompt) to the public scope; returns its full blocks.

        Every tenant's chain then runs through these blocks first and continues in its own scope
        after them, so the public part is shared and the rest stays private.
        """
        raw = hashing.tokens_to_bytes(tokens, self.config.vocab_size)
        num_blocks = hashing.publish_prefix(self.hasher, raw, self._published)
        self._epoch += 1
        return num_blocks

    def set_published(self, prefixes: Sequence[Tokens]) -> list[int]:
        """Make ``prefixes`` the only published prefixes, withdrawing any others; returns each one's
        full blocks. A withdrawn prefix's cached blocks are no longer reached by any prompt (prompts
        then key those tokens in their own scope) and age out of the pool like any unused block.
        Every prefix is validated before anything changes."""
        raws = [hashing.tokens_to_bytes(tokens, self.config.vocab_size) for tokens in prefixes]
        published: hashing.Published = {}
        counts = [hashing.publish_prefix(self.hasher, raw, published) for raw in raws]
        self._published = published
        self._epoch += 1
        return counts

    def _prompt(self, prompt: Prompt | Tokens, scope: Scope | str | None) -> Prompt:
        if isinstance(prompt, Prompt):
            if scope is not None and as_scope(scope) != prompt.scope:
                raise InvalidTokensError(
                    f"prompt was hashed for {prompt.scope}, not {as_scope(scope)}; hash it again"
                )
            if prompt.epoch != self._epoch and prompt.kind == KIND_TOKENS:
                return self._hash_encoded(prompt.raw + prompt.tail_raw, prompt.scope)
            return prompt
        return self.hash(prompt, scope)

    # ---- matching ------------------------------------------------------------------------

    def _match(self, prompt: Prompt) -> list[Block]:
        """The cached blocks of the prompt's longest visible prefix, each confirmed against what
        the block stores (parent key, content bytes, scope): a key collision is a miss, never
        another prompt's KV."""
        get = self.pool.index.get
        blocks = self.pool.blocks
        keys, contents = prompt.keys, prompt.contents
        hits: list[Block] = []
        num_public = prompt.num_public_blocks
        parent = prompt.root
        for i in range(num_public):
            block_id = get(keys[i])
            if block_id is None:
                return hits
            block = blocks[block_id]
            if block.parent != parent or block.content != contents[i] or block.scope != PUBLIC_SCOPE:
                return hits
            hits.append(block)
            parent = keys[i]
        parent = prompt.private_parent  # the private chain's parent, with or without a public prefix
        scope = prompt.scope.chain_scope
        k = self.config.k_anonymity
        gated = k > 1 and prompt.scope.is_shared
        tenant = prompt.scope.tenant
        if num_public:
            keys, contents = keys[num_public:], contents[num_public:]
        for key, content in zip(keys, contents, strict=True):
            block_id = get(key)
            if block_id is None:
                break
            block = blocks[block_id]
            if block.parent != parent or block.content != content or block.scope != scope:
                break
            if gated:
                writers = block.writers
                assert writers is not None
                if tenant not in writers and len(writers) < k:
                    break  # fewer than k tenants wrote it: a miss, so timing reveals nothing
            hits.append(block)
            parent = key
        return hits

    def lookup(self, prompt: Prompt | Tokens, scope: Scope | str | None = None) -> int:
        """Leading tokens of ``prompt`` cached and visible to ``scope``. No side effects."""
        prompt = self._prompt(prompt, scope)
        return len(self._match(prompt)) * self.block_size

    # ---- allocation ----------------------------------------------------------------------

    def _plan(self, tenant: str, num_new: int, pinned: set[int]) -> list[int | None]:
        """Where ``num_new`` blocks come from (see ``eviction``); raises, changing nothing."""
        if self._has_quotas:
            return eviction.plan_with_quotas(self.pool, self.config, tenant, num_new, pinned)
        return eviction.plan(self.pool, num_new, pinned)

    def _reusable(self, prompt: Prompt, matched: list[Block]) -> list[Block]:
        """The cached blocks ``allocate`` reuses of the ``matched`` prefix: all of them, less the
        last when it would cover the whole prompt and the config asks the model to produce the
        last logits."""
        whole = len(matched) * self.block_size >= prompt.num_tokens
        if self.config.cap_hit_to_prompt_minus_one and matched and whole:
            return matched[:-1]
        return matched

    def _prepare(
        self, request_id: Hashable, prompt: Prompt | Tokens, scope: Scope | str | None
    ) -> tuple[Prompt, list[Block]]:
        """Validate an allocation: the prompt and its matched (visible, cached) prefix."""
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use; free it first")
        prompt = self._prompt(prompt, scope)
        bs = self.block_size
        num_blocks = -(-prompt.num_tokens // bs)
        if num_blocks > self.pool.num_blocks:
            raise CapacityError(
                f"prompt of {prompt.num_tokens} tokens needs {num_blocks} blocks of {bs}; the "
                f"whole pool has {self.pool.num_blocks}. Raise num_blocks or shorten the prompt"
            )
        return prompt, self._match(prompt)

    def can_allocate(self, prompt: Prompt | Tokens, scope: Scope | str | None = None) -> bool:
        prompt = self._prompt(prompt, scope)
        num_blocks = -(-prompt.num_tokens // self.block_size)
        if num_blocks > self.pool.num_blocks:
            return False
        hits = self._reusable(prompt, self._match(prompt))
        num_new = num_blocks - len(hits)
        try:
            self._plan(prompt.scope.tenant, num_new, {b.block_id for b in hits if b.ref_count == 0})
        except CapacityError:
            return False
        return True

    def allocate(
        self, request_id: Hashable, prompt: Prompt | Tokens, scope: Scope | str | None = None
    ) -> Allocation:
        """Reuse the cached prefix of ``prompt`` and allocate blocks for the rest.

        Raises ``RequestError`` if ``request_id`` is running, ``CapacityError`` (or its subclass
        ``QuotaError``) if the blocks cannot be found; in both cases nothing changes. The evict
        hook runs for every block to be evicted before anything changes; if it raises, the error
        propagates and nothing changes either.
        """
        prompt, matched = self._prepare(request_id, prompt, scope)
        placed = self._place(prompt, matched)
        assert placed is not None  # without ``wait`` it raises instead
        return self._commit(request_id, prompt, *placed)

    def admit(
        self,
        request_id: Hashable,
        prompt: Prompt | Tokens,
        *,
        unwritten: Container[bytes],
        wait: bool = False,
    ) -> Allocation | None:
        """``allocate`` for a scheduler that overlaps requests, with the prefix matched once: None
        (nothing changed) when a block of the matched prefix has a key in ``unwritten`` (cached
        by a running request whose KV for it is not written yet), so the caller waits rather than
        reads it; with ``wait``, None too when the blocks cannot be found now (``try_allocate``;
        asked again for the same prompt object before the pool changed, it answers None without
        matching). Raises as ``allocate`` does otherwise."""
        if wait and self.still_refused(request_id, prompt):
            return None
        keyed, matched = self._prepare(request_id, prompt, None)
        if unwritten and any(b.key in unwritten for b in matched):
            return None
        placed = self._place(keyed, matched, wait)
        if placed is None:
            self._refused = (request_id, prompt, self.pool.room_version, self._epoch)
            return None
        return self._commit(request_id, keyed, *placed)

    def still_refused(self, request_id: Hashable, prompt: Prompt | Tokens) -> bool:
        """Whether ``admit(request_id, prompt, wait=True)`` refused this very prompt object room
        and nothing that could make room happened since (``BlockPool.room_version``, no publish):
        asked again, it would refuse again."""
        refused = self._refused
        return (
            refused is not None
            and refused[1] is prompt
            and refused[2] == self.pool.room_version
            and refused[3] == self._epoch
            and refused[0] == request_id
            and request_id not in self._requests  # else asking again raises: the id is in use
        )

    def _place(
        self, prompt: Prompt, matched: list[Block], wait: bool = False
    ) -> tuple[list[Block], list[int | None]] | None:
        """The hits a prompt reuses and where its other blocks come from. When the blocks cannot
        be found: None with ``wait`` (a caller that tries again later), else the planner's error;
        nothing changes either way."""
        hits = self._reusable(prompt, matched)
        num_new = -(-prompt.num_tokens // self.block_size) - len(hits)
        pinned = {b.block_id for b in hits if b.ref_count == 0}
        if not wait:
            return hits, self._plan(prompt.scope.tenant, num_new, pinned)
        if self._has_quotas:
            try:
                return hits, self._plan(prompt.scope.tenant, num_new, pinned)
            except CapacityError:
                return None
        plan = eviction.try_plan(self.pool, num_new, pinned)
        return None if plan is None else (hits, plan)

    def try_allocate(
        self, request_id: Hashable, prompt: Prompt | Tokens, scope: Scope | str | None = None
    ) -> Allocation | None:
        """``allocate``, but None (nothing changed) when the blocks cannot be found now, with the
        prefix matched once. Still raises for what waiting cannot fix: a running ``request_id``,
        bad tokens, or a prompt larger than the whole pool."""
        prompt, matched = self._prepare(request_id, prompt, scope)
        placed = self._place(prompt, matched, wait=True)
        return None if placed is None else self._commit(request_id, prompt, *placed)

    def _commit(
        self, request_id: Hashable, prompt: Prompt, hits: list[Block], plan: list[int | None]
    ) -> Allocation:
        pool = self.pool
        tenant = prompt.scope.tenant
        if pool.evict_hook is not None:
            pool.notify_evictions([v for v in plan if v is not None])  # may raise: nothing changed yet
        # Validated: from here on nothing raises.
        pool.touch(hits)
        new_blocks = pool.take(tenant, plan)
        num_hit = len(hits)
        num_keys = len(prompt.keys)
        if num_keys > num_hit:
            self._cache_blocks(prompt, new_blocks, num_hit, num_keys)
        block_ids = [b.block_id for b in hits]
        block_ids += [b.block_id for b in new_blocks]
        self._requests[request_id] = _Request(
            scope=prompt.scope,
            kind=prompt.kind,
            block_ids=block_ids,
            num_tokens=prompt.num_tokens,
            next_parent=prompt.parent_of(num_keys),
            tail_raw=prompt.tail_raw,
            num_hit_blocks=num_hit,
        )
        num_cached = num_hit * self.block_size
        stats = self._tenants.get(tenant)
        if stats is None:
            stats = self._tenants[tenant] = TenantStats()
        stats.record(prompt.num_tokens, num_cached)
        return Allocation(request_id, block_ids[:], num_cached, prompt.num_tokens)

    def _cache_blocks(self, prompt: Prompt, new_blocks: list[Block], num_hit: int, num_keys: int) -> None:
        """Index the prompt's full blocks ``num_hit..num_keys-1``, held by ``new_blocks``."""
        pool = self.pool
        tenant = prompt.scope.tenant
        gated = self.config.k_anonymity > 1 and prompt.scope.is_shared
        writer = tenant if gated else None
        keys, contents = prompt.keys, prompt.contents
        duplicates: list[bytes] = []
        num_public = prompt.num_public_blocks
        if num_hit < num_public:
            duplicates += pool.cache_run(
                new_blocks[: num_public - num_hit],
                keys[num_hit:num_public],
                prompt.parents(num_hit, num_public),
                contents[num_hit:num_public],
                PUBLIC_SCOPE,
                writer,
            )
        start = max(num_hit, num_public)
        duplicates += pool.cache_run(
            new_blocks[start - num_hit : num_keys - num_hit],
            keys[start:num_keys],
            prompt.parents(start, num_keys),
            contents[start:num_keys],
            prompt.scope.chain_scope,
            writer,
        )
        if gated:
            for key in duplicates:
                self._add_writer(key, tenant)

    def _add_writer(self, key: bytes, tenant: str) -> None:
        block = self.pool.cached(key)
        if block is not None and block.writers is not None:
            block.writers.add(tenant)

    def append(self, request_id: Hashable, tokens: Tokens) -> list[int]:
        """Grow a running request by decoded ``tokens``; returns the ids of any new blocks.

        A block becomes shareable (cached under its key) as soon as it fills; tokens that do not
        fill a block are only validated and buffered (hashing happens once per block).
        """
        req = self._requests.get(request_id)
        if req is None:
            raise RequestError(f"request id {request_id!r} is not running (unknown or freed)")
        if req.kind != KIND_TOKENS:
            raise InvalidTokensError(
                f"request {request_id!r} was allocated from block ids; it cannot grow by tokens"
            )
        raw = hashing.tokens_to_bytes(tokens, self.config.vocab_size)
        bs = self.block_size
        num_tokens = req.num_tokens + len(raw) // TOKEN_BYTES
        num_new = -(-num_tokens // bs) - len(req.block_ids)
        pool = self.pool
        tenant = req.scope.tenant
        new_ids: list[int] = []
        if num_new > 0:
            plan = self._plan(tenant, num_new, set())
            if pool.evict_hook is not None:
                pool.notify_evictions([v for v in plan if v is not None])  # may raise: nothing changed
            # Validated: from here on nothing raises.
            new_ids = [b.block_id for b in pool.take(tenant, plan)]
            req.block_ids += new_ids
        tail = req.tail_raw + raw
        width = bs * TOKEN_BYTES
        num_full = len(tail) // width
        if num_full:
            keys, contents = hashing.chain_blocks(req.next_parent, tail, width)
            first_full = req.num_tokens // bs
            blocks = pool.blocks
            gated = self.config.k_anonymity > 1 and req.scope.is_shared
            duplicates = pool.cache_run(
                [blocks[i] for i in req.block_ids[first_full : first_full + num_full]],
                keys,
                [req.next_parent, *keys[:-1]],
                contents,
                req.scope.chain_scope,
                tenant if gated else None,
            )
            if gated:
                for key in duplicates:
                    self._add_writer(key, tenant)
            req.next_parent = keys[-1]
            tail = tail[num_full * width :]
        req.tail_raw = tail
        req.num_tokens = num_tokens
        return new_ids

    def append_unkeyed(self, request_id: Hashable, num_tokens: int) -> list[int]:
        """Grow a running request allocated from block ids by ``num_tokens`` of unknown content (a
        replayed trace's outputs); returns the ids of any new blocks. They are allocated as
        ``append`` allocates and never keyed (see ``extend_unkeyed``)."""
        req = self._requests.get(request_id)
        if req is None:
            raise RequestError(f"request id {request_id!r} is not running (unknown or freed)")
        if req.kind != KIND_BLOCK_IDS:
            raise InvalidTokensError(f"request {request_id!r} was allocated from tokens; grow it by tokens")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise InvalidTokensError(f"num_tokens={num_tokens!r} must be an int >= 0")
        total = req.num_tokens + num_tokens
        if total <= len(req.block_ids) * self.block_size:  # decode growth: within its last block
            req.num_tokens = total
            return []
        num_new = -(-total // self.block_size) - len(req.block_ids)
        new_ids: list[int] = []
        if num_new > 0:
            pool = self.pool
            plan = self._plan(req.scope.tenant, num_new, set())
            if pool.evict_hook is not None:
                pool.notify_evictions([v for v in plan if v is not None])  # may raise: nothing changed
            new_ids = [b.block_id for b in pool.take(req.scope.tenant, plan)]
            req.block_ids += new_ids
        req.num_tokens = total
        return new_ids

    def free(self, request_id: Hashable) -> None:
        """Release a request's blocks; full ones stay cached (tail first in eviction order)."""
        req = self._requests.pop(request_id, None)
        if req is None:
            raise RequestError(f"request id {request_id!r} is not running (unknown or already freed)")
        self.pool.release(reversed(req.block_ids))

    def abort(self, request_id: Hashable, num_computed_tokens: int = 0) -> None:
        """Release a request whose KV was not (fully) computed: every block it cached itself
        (not the prefix it reused) is un-indexed before release, so no later request can hit a
        block whose contents were never written. Blocks wholly within the first
        ``num_computed_tokens`` tokens (whose KV the caller did write) stay cached."""
        req = self._requests.get(request_id)
        if req is None:
            raise RequestError(f"request id {request_id!r} is not running (unknown or already freed)")
        if (
            isinstance(num_computed_tokens, bool)
            or not isinstance(num_computed_tokens, int)
            or not (0 <= num_computed_tokens <= req.num_tokens)
        ):
            raise RequestError(
                f"num_computed_tokens={num_computed_tokens!r} must be an int in [0, {req.num_tokens}] "
                f"(the tokens request {request_id!r} holds blocks for)"
            )
        del self._requests[request_id]
        pool = self.pool
        keep = max(req.num_hit_blocks, num_computed_tokens // self.block_size)
        for block_id in req.block_ids[keep:]:
            block = pool.blocks[block_id]
            if block.key is not None:
                pool.uncache(block)
        pool.release(reversed(req.block_ids))

    # ---- observation ---------------------------------------------------------------------

    def block_ids(self, request_id: Hashable) -> list[int]:
        req = self._requests.get(request_id)
        if req is None:
            raise RequestError(f"request id {request_id!r} is not running (unknown or freed)")
        return list(req.block_ids)

    @property
    def num_running(self) -> int:
        return len(self._requests)

    def stats(self) -> CacheStats:
        pool = self.pool
        tenants = {t: TenantStats(s.requests, s.query_tokens, s.hit_tokens) for t, s in self._tenants.items()}
        return CacheStats(
            num_blocks=pool.num_blocks,
            used_blocks=pool.num_used_blocks,
            cached_free_blocks=len(pool.lru),
            free_blocks=len(pool.free),
            evictions=pool.num_evictions,
            requests=sum(s.requests for s in tenants.values()),
            query_tokens=sum(s.query_tokens for s in tenants.values()),
            hit_tokens=sum(s.hit_tokens for s in tenants.values()),
            tenants=tenants,
            owned_blocks={o: n for o, n in pool.owned.items() if n},
            events_dropped=pool.num_events_dropped,
        )

    def set_evict_hook(self, fn: Callable[[int, bytes], None] | None) -> None:
        """Call ``fn(block_id, key)`` synchronously for each cached block an ``allocate`` or
        ``append`` is about to evict, after the call is validated and before it changes anything.

        The block's KV bytes are still intact when ``fn`` runs, so it can copy them down to a
        spill tier (write-back). If ``fn`` raises, the call raises that error and the manager is
        left exactly as it was (the blocks stay cached). ``None`` removes the hook.
        """
        self.pool.evict_hook = fn

    def drain_events(self) -> list[CacheEvent]:
        """Blocks stored and removed since the last drain, in order (at most ``max_events``; the
        oldest beyond that were dropped and counted in ``stats().events_dropped``)."""
        return self.pool.drain_events()

    def drain_key_runs(self) -> list[tuple[bool, list[bytes]]]:
        """``drain_events`` as runs of block keys, ``(True, keys)`` stored and ``(False, keys)``
        removed, in order: what a router index reads (``PreciseIndex.apply_keys``), at no cost
        per block."""
        return self.pool.drain_key_runs()

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        referenced: dict[int, int] = {}
        for req in self._requests.values():
            assert len(req.block_ids) == -(-req.num_tokens // self.block_size)
            for block_id in req.block_ids:
                referenced[block_id] = referenced.get(block_id, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_count == referenced.get(block.block_id, 0), (
                f"block {block.block_id}: ref_count {block.ref_count}, "
                f"held by {referenced.get(block.block_id, 0)} requests"
            )
