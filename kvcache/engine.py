"""A single-sequence greedy engine that reuses cached KV blocks across requests and tenants.

    engine = Engine.load("tiny")                      # or a local model path
    engine.publish(system_prompt)                     # shared by every tenant
    for step in engine.stream(tokens, scope=Scope("acme"), max_new_tokens=32):
        ...                                           # step 0 arrives right after prefill (TTFT)

Per request: hash the prompt in its scope and allocate blocks through the ``BlockManager``; load
the cached prefix from the paged pool ``[num_layers, 2, num_blocks, block_size, kv_heads,
head_dim]`` with ONE ``gather_kv`` into the model's cache object; run the model on the uncached
suffix only; ``scatter_kv`` the newly filled blocks back in one call. Greedy decode continues on the
same cache, and each block that fills during decode is written to the pool and becomes shareable.
A request that fails is aborted, so no block whose KV was never written stays indexed.

Single-threaded: a server calls it from one worker thread. Not here: transformers (``hf``), block
bookkeeping (``manager``), batching several sequences (each request runs alone).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcache import hf
from kvcache.config import CacheConfig, TenantQuota
from kvcache.errors import ConfigError, TierError
from kvcache.events import CacheEvent
from kvcache.kernels import gather_kv, scatter_kv, unpack_blocks
from kvcache.manager import Allocation, BlockManager, Prompt
from kvcache.tenancy import Scope
from kvcache.tiers import Hierarchy, LayoutFingerprint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """``num_blocks`` x ``block_size`` tokens of KV in the pool; ``device``/``dtype`` default to CUDA
    + bfloat16 when present, else CPU + float32; ``seed`` seeds random-weight models.

    ``tiers``: a spill hierarchy below the pool, or a function that builds one from the engine's
    layout (known once the model is loaded), or None. Evicted blocks are written down to it, and
    prefix blocks it holds after the pool's hit are loaded instead of recomputed.

    ``k_anonymity`` and ``quotas`` go to the block manager (``CacheConfig``): share-group blocks
    become hits only once k tenants wrote them, and per-tenant floors and caps hold. Spill tiers
    cannot count writers, so requests of a share group under k > 1 never load from them.
    """

    num_blocks: int = 1024
    block_size: int = 16
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    tiers: Hierarchy | Callable[[LayoutFingerprint], Hierarchy] | None = None
    k_anonymity: int = 1
    quotas: Mapping[str, TenantQuota] = field(default_factory=dict)
    deployment_key: bytes | None = None  # keys block hashes (``CacheConfig.deployment_key``)

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}; choose one of {', '.join(_DTYPES)} or None")


@dataclass(frozen=True, slots=True)
class PrefillTimings:
    """Where a request's time to first token went, in seconds. ``overhead_s`` is the engine's own
    work (hashing, lookup and allocation, loads from spill tiers, block gather, cache construction,
    block scatter). ``tier_tokens``: prompt tokens loaded from spill tiers instead of recomputed."""

    hash_s: float
    lookup_s: float
    gather_s: float
    cache_s: float
    model_s: float
    scatter_s: float
    tier_s: float = 0.0
    tier_tokens: int = 0

    @property
    def overhead_s(self) -> float:
        return self.hash_s + self.lookup_s + self.tier_s + self.gather_s + self.cache_s + self.scatter_s


@dataclass(frozen=True, slots=True)
class GenerationStep:
    token_id: int
    index: int  # 0 = the token right after prefill
    prompt_tokens: int
    cached_tokens: int  # not recomputed: hits in the pool plus blocks loaded from spill tiers
    elapsed_s: float  # since the request started; step 0's is the TTFT
    timings: PrefillTimings | None = None  # step 0 only


@dataclass(frozen=True, slots=True)
class Generation:
    prompt_tokens: int
    cached_tokens: int
    output_tokens: list[int]
    ttft_s: float
    total_s: float
    timings: PrefillTimings | None = None


class Engine:
    """A causal LM, a paged KV pool and the block manager that indexes it."""

    def __init__(
        self, loaded: hf.LoadedModel, config: EngineConfig, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.shape = loaded.shape
        self.vocab_size = loaded.shape.vocab_size
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.block_size = config.block_size
        self.manager = BlockManager(
            CacheConfig(
                num_blocks=config.num_blocks,
                block_size=config.block_size,
                vocab_size=self.vocab_size,
                model_id=self.model_id,
                k_anonymity=config.k_anonymity,
                quotas=dict(config.quotas),
                deployment_key=config.deployment_key,
            )
        )
        s = loaded.shape
        # [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]
        self.pool = torch.zeros(
            (s.num_layers, 2, config.num_blocks, config.block_size, s.kv_heads, s.head_dim),
            dtype=self.dtype,
            device=self.device,
        )
        self._clock = clock
        self._sync: Callable[[], None] = (
            torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        )
        self._request_ids = itertools.count()
        self.layout = LayoutFingerprint.of_pool(self.model_id, self.pool)
        tiers = config.tiers
        self.tiers: Hierarchy | None = (
            tiers if isinstance(tiers, Hierarchy) or tiers is None else tiers(self.layout)
        )
        if self.tiers is not None:
            if self.tiers.layout != self.layout:
                raise TierError(
                    f"the spill hierarchy stores {self.tiers.layout}, this engine's blocks are "
                    f"{self.layout}; build it with engine.layout (pass a function as tiers=)"
                )
            self.manager.set_evict_hook(self.tiers.evict_hook(self.pool))

    @classmethod
    def load(cls, model: str = "tiny", config: EngineConfig | None = None) -> Engine:
        """A random-weight model (``tiny``, ``tiny-llama``, ``tiny-qwen2``, ...) or a local model."""
        config = config or EngineConfig()
        dtype = _DTYPES[config.dtype] if config.dtype is not None else None
        return cls(hf.load_model(model, device=config.device, dtype=dtype, seed=config.seed), config)

    # ---- public API ----------------------------------------------------------------------

    def publish(self, tokens: Sequence[int]) -> int:
        """Make ``tokens`` (e.g. a system prompt) a public prefix every tenant shares; returns its
        full blocks. Their KV is computed by the first request that uses them."""
        return self.manager.publish(tokens)

    def drain_events(self) -> list[CacheEvent]:
        return self.manager.drain_events()

    def generate(
        self,
        tokens: Sequence[int],
        scope: Scope | str | None = None,
        max_new_tokens: int = 16,
        request_id: Hashable | None = None,
    ) -> Generation:
        steps = list(self.stream(tokens, scope, max_new_tokens, request_id))
        first, last = steps[0], steps[-1]
        return Generation(
            prompt_tokens=first.prompt_tokens,
            cached_tokens=first.cached_tokens,
            output_tokens=[s.token_id for s in steps],
            ttft_s=first.elapsed_s,
            total_s=last.elapsed_s,
            timings=first.timings,
        )

    def stream(
        self,
        tokens: Sequence[int],
        scope: Scope | str | None = None,
        max_new_tokens: int = 16,
        request_id: Hashable | None = None,
    ) -> Iterator[GenerationStep]:
        """Greedy tokens one by one; step 0 comes right after prefill. Blocks are released when
        the iterator finishes or is closed."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
        rid = request_id if request_id is not None else ("engine", next(self._request_ids))
        return self._run(tokens, scope, max_new_tokens, rid)

    def score(
        self, tokens: Sequence[int], scope: Scope | str | None = None, request_id: Hashable | None = None
    ) -> tuple[torch.Tensor, int]:
        """Next-token logits ``[vocab]`` (float32) after ``tokens`` and how many prompt tokens came
        from the cache: the prefill of :meth:`stream`, exactly, without decoding."""
        rid = request_id if request_id is not None else ("engine", next(self._request_ids))
        start = self._clock()
        prompt = self.manager.hash(tokens, scope)
        t_hash = self._clock()
        alloc = self.manager.allocate(rid, prompt)
        t_lookup = self._clock()
        try:
            with torch.inference_mode():
                logits, _, timings = self._prefill(prompt, alloc, t_hash - start, t_lookup - t_hash)
        except BaseException:
            self.manager.abort(rid)
            raise
        self.manager.free(rid)
        return logits, alloc.num_cached_tokens + timings.tier_tokens

    # ---- the request path ----------------------------------------------------------------

    def _run(
        self, tokens: Sequence[int], scope: Scope | str | None, max_new_tokens: int, rid: Hashable
    ) -> Iterator[GenerationStep]:
        clock, manager = self._clock, self.manager
        start = clock()
        prompt = manager.hash(tokens, scope)
        t_hash = clock()
        alloc = manager.allocate(rid, prompt)
        t_lookup = clock()
        done = False
        try:
            with torch.inference_mode():
                logits, cache, timings = self._prefill(prompt, alloc, t_hash - start, t_lookup - t_hash)
                token = int(logits.argmax())
                n = len(tokens)
                num_cached = alloc.num_cached_tokens + timings.tier_tokens
                yield GenerationStep(token, 0, n, num_cached, clock() - start, timings)
                block_ids = list(alloc.block_ids)
                ids = torch.empty((1, 1), dtype=torch.long, device=self.device)
                for index in range(1, max_new_tokens):
                    pos = n + index - 1  # position of ``token``, whose KV this step computes
                    ids.fill_(token)
                    logits = hf.forward(self.model, ids, cache, pos)
                    block_ids += manager.append(rid, [token])
                    if (pos + 1) % self.block_size == 0:  # the block ending at ``pos`` is full
                        self._write_blocks(cache, block_ids, pos + 1 - self.block_size, pos + 1)
                    token = int(logits[0].argmax())
                    yield GenerationStep(token, index, n, num_cached, clock() - start)
            done = True
        except GeneratorExit:
            done = True  # closed early by the consumer: every indexed block was already written
            raise
        finally:
            if done:
                manager.free(rid)
            else:
                manager.abort(rid)

    def _prefill(
        self, prompt: Prompt, alloc: Allocation, hash_s: float, lookup_s: float
    ) -> tuple[torch.Tensor, Any, PrefillTimings]:
        clock, sync, bs = self._clock, self._sync, self.block_size
        tokens = prompt.tokens
        assert tokens is not None
        t_tier = clock()
        num_loaded = self._load_from_tiers(prompt, alloc)
        sync()
        t0 = clock()
        num_hit = alloc.num_cached_tokens // bs + num_loaded
        num_cached = num_hit * bs
        kv = None
        if num_hit:
            hit_ids = torch.tensor(alloc.block_ids[:num_hit], dtype=torch.long, device=self.device)
            kv = gather_kv(self.pool, hit_ids)  # [L, 2, kv_heads, num_cached, head_dim]
            sync()
        t_gather = clock()
        cache = hf.new_cache(kv)
        t_cache = clock()
        suffix = torch.tensor([list(tokens[num_cached:])], dtype=torch.long, device=self.device)
        logits = hf.forward(self.model, suffix, cache, num_cached)[0]
        sync()
        t_model = clock()
        self._write_blocks(cache, alloc.block_ids, num_hit * bs, len(tokens) // bs * bs)
        sync()
        t_scatter = clock()
        timings = PrefillTimings(
            hash_s=hash_s,
            lookup_s=lookup_s,
            gather_s=t_gather - t0,
            cache_s=t_cache - t_gather,
            model_s=t_model - t_cache,
            scatter_s=t_scatter - t_model,
            tier_s=t0 - t_tier,
            tier_tokens=num_loaded * bs,
        )
        return logits, cache, timings

    def tiers_gated(self, prompt: Prompt) -> bool:
        """Whether ``prompt`` must not use the spill tiers: a share group under k-anonymity. A tier
        cannot tell how many tenants wrote a block, so a load could reveal what one tenant sent."""
        return self.manager.config.k_anonymity > 1 and prompt.scope.is_shared

    def _load_from_tiers(self, prompt: Prompt, alloc: Allocation) -> int:
        """Load the prefix blocks the spill tiers hold right after the pool's hit into the
        request's own (freshly allocated) blocks, in one unpack; returns how many."""
        if self.tiers is None or self.tiers_gated(prompt):
            return 0
        bs = self.block_size
        first = alloc.num_cached_tokens // bs
        # Leave at least one prompt token to compute: the model must produce the last logits.
        last = min(len(prompt.keys), (prompt.num_tokens - 1) // bs)
        if last <= first or not self.tiers.lookup_prefix(prompt.keys[first : first + 1]):
            return 0
        packed = self.tiers.load(prompt.keys[first:last], context_tokens=first * bs)  # [n, L, 2, bs, H, D]
        n = packed.shape[0]
        if n:
            ids = torch.tensor(alloc.block_ids[first : first + n], dtype=torch.long, device=self.device)
            unpack_blocks(self.pool, ids, packed.to(self.device))
        return n

    def _write_blocks(self, cache: Any, block_ids: list[int], start: int, end: int) -> None:
        """Scatter positions ``start:end`` (block-aligned) of ``cache`` into their pool blocks."""
        if end <= start:
            return
        bs = self.block_size
        ids = torch.tensor(block_ids[start // bs : end // bs], dtype=torch.long, device=self.device)
        scatter_kv(self.pool, ids, hf.read_cache(cache, start, end))
