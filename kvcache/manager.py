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
requests on workers (``router``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from kvcache import hashing
from kvcache.block_pool import Block, BlockPool
from kvcache.config import CacheConfig
from kvcache.errors import CapacityError, InvalidTokensError, QuotaError, RequestError
from kvcache.events import CacheEvent
from kvcache.hashing import KIND_BLOCK_IDS, KIND_TOKENS, TOKEN_BYTES, Hasher
from kvcache.stats import CacheStats, TenantStats
from kvcache.tenancy import PUBLIC_SCOPE, Scope, as_scope


@dataclass(slots=True)
class Prompt:
    """A prompt's block keys in one scope: computed once, usable for lookup and allocate.

    ``keys[i]`` is the key of full block ``i``; blocks ``< num_public_blocks`` are keyed in the
    public scope, the rest in ``scope.chain_scope``. Valid until the next ``publish`` (a stale
    prompt is re-hashed by the manager).
    """

    scope: Scope
    kind: str
    num_tokens: int
    keys: list[bytes]
    raw: bytes  # encoded content of the full blocks, ``width`` bytes each
    width: int
    root: bytes  # parent of block 0
    private_parent: bytes  # parent of block ``num_public_blocks``
    num_public_blocks: int
    tail_tokens: list[int]  # the partial last block (token prompts only)
    epoch: int
    tokens: Sequence[int] | None = field(default=None, repr=False)

    def content(self, i: int) -> bytes:
        """Block ``i``'s encoded tokens (or id): sliced on demand, only for blocks that need it."""
        return self.raw[i * self.width : (i + 1) * self.width]

    def parent_of(self, i: int) -> bytes:
        if i == self.num_public_blocks:
            return self.private_parent
        return self.keys[i - 1] if i else self.root

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
    tail_tokens: list[int]
    num_hit_blocks: int = 0  # leading blocks reused from the cache; the rest were taken fresh


class BlockManager:
    """Prefix-hash block manager with tenant isolation, k-anonymous sharing and quotas."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        self.pool = BlockPool(config.num_blocks)
        self.hasher = Hasher(
            block_size=config.block_size,
            model_id=config.model_id,
            adapter_id=config.adapter_id,
            deployment_key=config.deployment_key,
        )
        self._published: dict[bytes, tuple[bytes, bytes]] = {}  # key -> (parent, content)
        self._epoch = 0
        self._requests: dict[Hashable, _Request] = {}
        self._tenants: dict[str, TenantStats] = {}
        self._has_quotas = bool(config.quotas) or config.default_quota != type(config.default_quota)()

    # ---- hashing -------------------------------------------------------------------------

    def hash(self, tokens: Sequence[int], scope: Scope | str | None = None) -> Prompt:
        """Key every full block of ``tokens`` in ``scope``, through any published public prefix."""
        scope = as_scope(scope)
        raw = hashing.tokens_to_bytes(tokens, self.config.vocab_size)
        bs = self.block_size
        width = bs * TOKEN_BYTES
        num_full = len(tokens) // bs
        keys: list[bytes] = []
        private_root = self.hasher.root(scope.chain_scope)
        root = private_root
        if self._published:
            root = key = self.hasher.root(PUBLIC_SCOPE)
            while len(keys) < num_full:
                start = len(keys) * width
                content = raw[start : start + width]
                child = hashing.link(key, content)
                if self._published.get(child) != (key, content):
                    break
                keys.append(child)
                key = child
        num_public = len(keys)
        private_parent = hashing.switch(private_root, keys[-1]) if num_public else private_root
        keys += hashing.chain(private_parent, raw[num_public * width : num_full * width], width)
        return Prompt(
            scope=scope,
            kind=KIND_TOKENS,
            num_tokens=len(tokens),
            keys=keys,
            raw=raw[: num_full * width],
            width=width,
            root=root,
            private_parent=private_parent,
            num_public_blocks=num_public,
            tail_tokens=list(tokens[num_full * bs :]),
            epoch=self._epoch,
            tokens=tokens,
        )

    def hash_block_ids(
        self, block_ids: Sequence[int], num_tokens: int, scope: Scope | str | None = None
    ) -> Prompt:
        """Key a prompt given as precomputed per-block ids (one id per ``block_size`` tokens, the
        last block possibly partial), as in Mooncake traces' ``hash_ids``."""
        scope = as_scope(scope)
        bs = self.block_size
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
        keys = hashing.chain(root, raw, width)
        return Prompt(scope, KIND_BLOCK_IDS, num_tokens, keys, raw, width, root, root, 0, [], self._epoch)

    def publish(self, tokens: Sequence[int]) -> int:
        """Publish a prefix (e.g. a system prompt) to the public scope; returns its full blocks.

        Every tenant's chain then runs through these blocks first and continues in its own scope
        after them, so the public part is shared and the rest stays private.
        """
        raw = hashing.tokens_to_bytes(tokens, self.config.vocab_size)
        width = self.block_size * TOKEN_BYTES
        parent = self.hasher.root(PUBLIC_SCOPE)
        keys = hashing.chain(parent, raw, width)
        for i, key in enumerate(keys):
            self._published[key] = (parent, raw[i * width : (i + 1) * width])
            parent = key
        self._epoch += 1
        return len(keys)

    def _prompt(self, prompt: Prompt | Sequence[int], scope: Scope | str | None) -> Prompt:
        if isinstance(prompt, Prompt):
            if scope is not None and as_scope(scope) != prompt.scope:
                raise InvalidTokensError(
                    f"prompt was hashed for {prompt.scope}, not {as_scope(scope)}; hash it again"
                )
            if prompt.epoch != self._epoch and prompt.kind == KIND_TOKENS and prompt.tokens is not None:
                return self.hash(prompt.tokens, prompt.scope)
            return prompt
        return self.hash(prompt, scope)

    # ---- matching ------------------------------------------------------------------------

    def _match(self, prompt: Prompt) -> list[Block]:
        """The cached blocks of the prompt's longest visible prefix, confirmed one by one."""
        pool = self.pool
        tenant = prompt.scope.tenant
        k = self.config.k_anonymity
        gated = k > 1 and prompt.scope.is_shared
        hits: list[Block] = []
        parent = prompt.root
        num_public = prompt.num_public_blocks
        for i, key in enumerate(prompt.keys):
            block = pool.cached(key)
            if block is None:
                break
            if i == num_public:
                parent = prompt.private_parent
            scope = PUBLIC_SCOPE if i < num_public else prompt.scope.chain_scope
            if block.parent != parent or block.content != prompt.content(i) or block.scope != scope:
                break  # a key collision: never serve another prompt's KV
            if gated and i >= num_public:
                writers = block.writers
                assert writers is not None
                if tenant not in writers and len(writers) < k:
                    break  # fewer than k tenants wrote it: a miss, so timing reveals nothing
            hits.append(block)
            parent = key
        return hits

    def lookup(self, prompt: Prompt | Sequence[int], scope: Scope | str | None = None) -> int:
        """Leading tokens of ``prompt`` cached and visible to ``scope``. No side effects."""
        prompt = self._prompt(prompt, scope)
        return len(self._match(prompt)) * self.block_size

    # ---- allocation ----------------------------------------------------------------------

    def _plan(self, tenant: str, num_new: int, pinned: set[int]) -> list[int | None]:
        """Choose where ``num_new`` blocks for ``tenant`` come from, without changing anything:
        a cached block id to evict, or None for a never-cached free block. Raises when they
        cannot all be found. ``pinned``: cached blocks about to be reused, never evicted."""
        pool = self.pool
        if not self._has_quotas:
            available = len(pool.free) + len(pool.lru) - len(pinned)
            if num_new > available:
                raise CapacityError(
                    f"need {num_new} free blocks, only {available} of {pool.num_blocks} can be "
                    "freed (the rest are in use by running requests); nothing was allocated"
                )
            return [None] * num_new
        config = self.config
        plan: list[int | None] = []
        chosen: set[int] = set()
        cap = config.quota_for(tenant).cap_blocks
        owned = pool.owned.get(tenant, 0)
        over_cap = owned + num_new - cap if cap is not None else 0
        if over_cap > 0:
            for block_id in pool.lru_of(tenant):
                if len(plan) == over_cap:
                    break
                if block_id not in pinned:
                    plan.append(block_id)
                    chosen.add(block_id)
            if len(plan) < over_cap:
                raise QuotaError(
                    f"tenant {tenant!r} owns {owned} blocks and needs {num_new} more, over its "
                    f"cap_blocks={cap}, and only {len(plan)} of its own cached blocks can be "
                    "evicted; nothing was allocated"
                )
        evicted: dict[str, int] = {tenant: len(plan)}
        plan.extend([None] * min(len(pool.free), num_new - len(plan)))
        if len(plan) < num_new:
            # Oldest first, skipping owners at or below their floor (the requester included, so
            # a tenant within its floor is never evicted by its own load while others' blocks
            # can go instead).
            for block_id in pool.lru:
                if block_id in pinned or block_id in chosen:
                    continue
                owner = pool.blocks[block_id].owner
                if pool.owned[owner] - evicted.get(owner, 0) <= config.quota_for(owner).floor_blocks:
                    continue
                evicted[owner] = evicted.get(owner, 0) + 1
                chosen.add(block_id)
                plan.append(block_id)
                if len(plan) == num_new:
                    break
        if len(plan) < num_new:
            # Last resort: the requester's own cached blocks, below its own floor.
            for block_id in pool.lru_of(tenant):
                if len(plan) == num_new:
                    break
                if block_id not in pinned and block_id not in chosen:
                    plan.append(block_id)
        if len(plan) < num_new:
            raise CapacityError(
                f"need {num_new} free blocks for tenant {tenant!r}, only {len(plan)} can be freed "
                "(the rest are in use or protected by other tenants' floors); nothing was allocated"
            )
        return plan

    def _take(self, tenant: str, plan: list[int | None]) -> list[Block]:
        take = self.pool.take
        return [take(tenant, victim) for victim in plan]

    def _reusable(self, prompt: Prompt) -> list[Block]:
        """The cached blocks ``allocate`` reuses: the visible prefix, less the last block when it
        would cover the whole prompt and the config asks the model to produce the last logits."""
        hits = self._match(prompt)
        whole = len(hits) * self.block_size >= prompt.num_tokens
        if self.config.cap_hit_to_prompt_minus_one and hits and whole:
            hits.pop()
        return hits

    def can_allocate(self, prompt: Prompt | Sequence[int], scope: Scope | str | None = None) -> bool:
        prompt = self._prompt(prompt, scope)
        num_blocks = -(-prompt.num_tokens // self.block_size)
        if num_blocks > self.pool.num_blocks:
            return False
        hits = self._reusable(prompt)
        num_new = num_blocks - len(hits)
        try:
            self._plan(prompt.scope.tenant, num_new, {b.block_id for b in hits if b.ref_count == 0})
        except CapacityError:
            return False
        return True

    def allocate(
        self, request_id: Hashable, prompt: Prompt | Sequence[int], scope: Scope | str | None = None
    ) -> Allocation:
        """Reuse the cached prefix of ``prompt`` and allocate blocks for the rest.

        Raises ``RequestError`` if ``request_id`` is running, ``CapacityError`` (or its subclass
        ``QuotaError``) if the blocks cannot be found; in both cases nothing changes.
        """
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
        hits = self._reusable(prompt)
        num_new = num_blocks - len(hits)
        tenant = prompt.scope.tenant
        plan = self._plan(tenant, num_new, {b.block_id for b in hits if b.ref_count == 0})

        # Validated: from here on nothing raises.
        pool = self.pool
        for block in hits:
            pool.touch(block)
        new_blocks = self._take(tenant, plan)
        num_hit = len(hits)
        keys = prompt.keys
        gated = self.config.k_anonymity > 1 and prompt.scope.is_shared
        for j, block in enumerate(new_blocks[: len(keys) - num_hit]):
            i = num_hit + j
            key = keys[i]
            scope = prompt.scope_of(i)
            writer = tenant if gated else None
            if not pool.cache(block, key, prompt.parent_of(i), prompt.content(i), scope, writer) and gated:
                self._add_writer(key, tenant)
        block_ids = [b.block_id for b in hits]
        block_ids += [b.block_id for b in new_blocks]
        self._requests[request_id] = _Request(
            scope=prompt.scope,
            kind=prompt.kind,
            block_ids=block_ids,
            num_tokens=prompt.num_tokens,
            next_parent=prompt.parent_of(len(keys)),
            tail_tokens=list(prompt.tail_tokens),
            num_hit_blocks=num_hit,
        )
        num_cached = num_hit * bs
        stats = self._tenants.get(tenant)
        if stats is None:
            stats = self._tenants[tenant] = TenantStats()
        stats.record(prompt.num_tokens, num_cached)
        return Allocation(request_id, list(block_ids), num_cached, prompt.num_tokens)

    def _add_writer(self, key: bytes, tenant: str) -> None:
        block = self.pool.cached(key)
        if block is not None and block.writers is not None:
            block.writers.add(tenant)

    def append(self, request_id: Hashable, tokens: Sequence[int]) -> list[int]:
        """Grow a running request by decoded ``tokens``; returns the ids of any new blocks.

        A block becomes shareable (cached under its key) as soon as it fills.
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
        num_tokens = req.num_tokens + len(tokens)
        num_new = -(-num_tokens // bs) - len(req.block_ids)
        plan = self._plan(req.scope.tenant, num_new, set())

        new_blocks = self._take(req.scope.tenant, plan)
        req.block_ids += [b.block_id for b in new_blocks]
        pool = self.pool
        scope = req.scope.chain_scope
        gated = self.config.k_anonymity > 1 and req.scope.is_shared
        writer = req.scope.tenant if gated else None
        tail = req.tail_tokens
        tail_raw = hashing.tokens_to_bytes(tail) if tail else b""
        first_full = req.num_tokens // bs
        raw = tail_raw + raw
        width = bs * TOKEN_BYTES
        keys = hashing.chain(req.next_parent, raw, width)
        parent = req.next_parent
        for j, key in enumerate(keys):
            block = pool.blocks[req.block_ids[first_full + j]]
            content = raw[j * width : (j + 1) * width]
            if not pool.cache(block, key, parent, content, scope, writer) and gated:
                self._add_writer(key, req.scope.tenant)
            parent = key
        req.next_parent = parent
        all_tail = [*tail, *tokens]
        req.tail_tokens = all_tail[len(keys) * bs :]
        req.num_tokens = num_tokens
        return [b.block_id for b in new_blocks]

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
        )

    def set_evict_hook(self, fn: Callable[[int, bytes], None] | None) -> None:
        """Call ``fn(block_id, key)`` synchronously just before a cached block's slot is reused.

        The block's KV bytes are still intact when ``fn`` runs, so it can copy them down to a
        spill tier (write-back). ``fn`` must not raise: it runs inside an allocation that has
        already been validated. ``None`` removes the hook.
        """
        self.pool.evict_hook = fn

    def drain_events(self) -> list[CacheEvent]:
        """Blocks stored and removed since the last drain, in order."""
        return self.pool.drain_events()

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
