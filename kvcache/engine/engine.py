"""The batched engine: a causal LM, the paged KV pool, the block manager, and the step loop.

    engine = Engine.load("tiny")                      # or a local model path
    engine.publish(system_prompt)                     # shared by every tenant
    for step in engine.stream(tokens, scope=Scope("acme"), max_new_tokens=32):
        ...                                           # step 0 arrives right after prefill (TTFT)

    rid = engine.add_request(tokens, "acme", SamplingParams(max_tokens=8, temperature=0.7, seed=1))
    while engine.has_unfinished():
        for out in engine.step(): ...                 # every running request advances each step

Each ``step()`` asks the scheduler which sequences run and how many tokens each (``scheduler``),
runs them as ONE forward whose attention reads and writes KV straight in the pool
``[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]`` (``runner``), samples
(``sampling``), and finishes or streams. A cached prefix costs nothing to load: it is read in place.
Prefix blocks that spill tiers hold after the pool's hit are loaded into the sequence's own blocks
at admission (``prefix_load``: its rules, the one implementation); while a request waits, the
ones in G3 or the pod tier are prefetched into host memory on a background thread
(``prefetch``), so that load runs at host-memory speed.
Every step's cost is recorded (:class:`StepRecord`), which ``kvcache calibrate`` fits.

Models must route attention through transformers' ``AttentionInterface`` (Llama, Qwen2, Mistral
with its sliding window, GPT-2, Phi and most decoder-only families do); others are refused at load
with :class:`ModelError`. Single-threaded: a server drives it from one thread (``AsyncEngine``);
only the tier prefetch runs on its own thread, touching the tiers alone, under their lock.
Not here: transformers (``hf``), block bookkeeping (``manager``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from kvcache.cache.config import DEFAULT_BLOCK_SIZE, CacheConfig, TenantQuota
from kvcache.cache.events import CacheEvent
from kvcache.cache.manager import Allocation, BlockManager, Prompt
from kvcache.cache.tenancy import Scope, as_scope
from kvcache.costs import ENGINE_MAX_NUM_BATCHED_TOKENS, ENGINE_MAX_NUM_SEQS
from kvcache.engine.prefetch import Prefetcher, PrefetchStats, Settled
from kvcache.engine.prefix_load import load_prefix
from kvcache.engine.runner import ModelRunner
from kvcache.engine.sampling import SamplingParams, sample
from kvcache.engine.scheduler import Scheduler, SchedulerConfig, loadable_blocks, tiers_gated
from kvcache.engine.sequence import Sequence as Seq
from kvcache.errors import ConfigError, InvalidTokensError, ModelError, RequestError, TierError
from kvcache.kernels.dispatch import Backend
from kvcache.model import hf
from kvcache.model import registry as models
from kvcache.tiers import Hierarchy, HostTier, LayoutFingerprint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """``num_blocks`` x ``block_size`` tokens of KV in the pool; ``device``/``dtype`` default to CUDA
    + bfloat16 when present, else CPU + float32; ``seed`` seeds random-weight models and the
    sampling of requests that bring no seed of their own.

    ``tiers``: a spill hierarchy below the pool, or a function that builds one from the engine's
    layout (known once the model is loaded), or None. Evicted blocks are written down to it, and
    prefix blocks it holds after the pool's hit are loaded instead of recomputed.

    ``k_anonymity`` and ``quotas`` go to the block manager (``CacheConfig``): share-group blocks
    become hits only once k tenants wrote them, and per-tenant floors and caps hold. Spill tiers
    cannot count writers, so requests of a share group under k > 1 never load from them.

    ``max_num_batched_tokens`` / ``max_num_seqs``: the scheduler's per-step token budget and
    running-sequence cap. ``kernel_backend``: paged attention implementation (``kvcache.kernels``).
    ``max_step_records``: the newest step costs kept for calibration (older ones are dropped).

    ``prefetch``: while a request waits, move its prefix blocks held in the hierarchy's lower
    tiers (G3, pod tier) into its first tier, host memory, on a background thread. None = on
    when the first tier is a ``HostTier`` with tiers below it. ``prefetch_max_blocks``: cap on
    blocks reserved by waiting requests (None = half the host tier), so prefetch cannot flush
    the host tier.
    """

    num_blocks: int = 1024
    block_size: int = DEFAULT_BLOCK_SIZE
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    tiers: Hierarchy | Callable[[LayoutFingerprint], Hierarchy] | None = None
    k_anonymity: int = 1
    quotas: Mapping[str, TenantQuota] = field(default_factory=dict)
    deployment_key: bytes | None = None  # keys block hashes (``CacheConfig.deployment_key``)
    max_num_batched_tokens: int = ENGINE_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = ENGINE_MAX_NUM_SEQS
    kernel_backend: Backend = "auto"
    max_step_records: int = 100_000
    prefetch: bool | None = None
    prefetch_max_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}; choose one of {', '.join(_DTYPES)} or None")
        SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs)  # validates both
        if not isinstance(self.max_step_records, int) or self.max_step_records < 0:
            raise ConfigError(f"max_step_records={self.max_step_records!r} must be an integer >= 0")
        if self.prefetch is not None and not isinstance(self.prefetch, bool):
            raise ConfigError(f"prefetch={self.prefetch!r} must be True, False or None (automatic)")
        cap = self.prefetch_max_blocks
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ConfigError(f"prefetch_max_blocks={cap!r} must be an integer >= 1 or None")


@dataclass(frozen=True, slots=True)
class PrefillTimings:
    """Where a request's time to first token went, in seconds. ``overhead_s`` is the engine's own
    work (hashing, lookup and allocation, loads from spill tiers; the pool is read in place, so
    nothing is gathered or scattered). ``model_s``: the forward passes that carried its
    prompt (shared with the other sequences of those steps). ``queue_s``: waiting for admission.
    ``tier_tokens``: prompt tokens loaded from spill tiers instead of recomputed."""

    hash_s: float
    lookup_s: float
    model_s: float
    tier_s: float = 0.0
    tier_tokens: int = 0
    queue_s: float = 0.0

    @property
    def overhead_s(self) -> float:
        return self.hash_s + self.lookup_s + self.tier_s


@dataclass(frozen=True, slots=True)
class GenerationStep:
    token_id: int
    index: int  # 0 = the token right after prefill
    prompt_tokens: int
    cached_tokens: int  # not recomputed: hits in the pool plus blocks loaded from spill tiers
    elapsed_s: float  # since the request was added; step 0's is the TTFT
    timings: PrefillTimings | None = None  # step 0 only


@dataclass(frozen=True, slots=True)
class Generation:
    prompt_tokens: int
    cached_tokens: int
    output_tokens: list[int]
    ttft_s: float
    total_s: float
    timings: PrefillTimings | None = None


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one step did for one request: a new token, and whether (and why) it finished."""

    request_id: Hashable
    step: GenerationStep | None
    finished: bool
    finish_reason: str | None = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step's shape and cost: the input of ``kvcache calibrate``'s latency fit.
    ``attention_work`` = sum over prefill chunks of ``n * (context before + n / 2)``."""

    num_prefill_tokens: int
    num_decode_seqs: int
    num_context_tokens: int
    attention_work: float
    seconds: float  # the whole step: schedule, metadata, forward, sampling
    model_seconds: float  # the model forward alone (the rest is the engine's overhead)


class Engine:
    """A causal LM, a paged KV pool, the block manager that indexes it, and the batching loop."""

    def __init__(
        self, loaded: hf.LoadedModel, config: EngineConfig, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        reason = hf.paged_support(loaded.model)
        if reason is not None:
            raise ModelError(
                f"{loaded.model_id} cannot run on the paged engine: {reason}. Supported: models whose "
                "attention goes through transformers' AttentionInterface with a layer index (Llama, "
                "Qwen2, Mistral, GPT-2, Phi and most decoder-only families)"
            )
        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.shape = loaded.shape
        self.vocab_size = loaded.shape.vocab_size
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.block_size = config.block_size
        self.eos_token_ids = hf.eos_token_ids(loaded)
        manager = BlockManager(
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
        self._rng = torch.Generator().manual_seed(config.seed)
        self._seqs: dict[Hashable, Seq] = {}
        self._watched: set[Hashable] = set()  # requests a stream consumes: kept until it ends
        self.scheduler = Scheduler(
            manager,
            SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs),
            load_prefix=self._load_prefix,
        )
        # the block table is the current manager's (``manager`` can be replaced between requests)
        self.runner = ModelRunner(
            self.model, self.pool, self.device, lambda rid: self.manager.block_ids(rid), config.kernel_backend
        )
        self.step_records: collections.deque[StepRecord] = collections.deque(maxlen=config.max_step_records)
        self.layout = LayoutFingerprint.of_pool(self.model_id, self.pool, loaded.weights_digest)
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
        self.prefetcher = self._make_prefetcher(config)
        self._prefetching: set[Hashable] = set()  # requests with a prefetch job (engine thread)

    def _make_prefetcher(self, config: EngineConfig) -> Prefetcher | None:
        h = self.tiers
        able = h is not None and len(h.tiers) > 1 and isinstance(h.tiers[0], HostTier)
        if config.prefetch is False or (config.prefetch is None and not able):
            return None
        if h is None or not able:
            tiers = "no hierarchy" if h is None else f"tiers {[t.name for t in h.tiers]}"
            raise ConfigError(
                f"prefetch=True needs a hierarchy whose first tier is a HostTier with tiers below it, "
                f"got {tiers}; add one, or leave prefetch=None"
            )
        cap = config.prefetch_max_blocks or max(1, h.tiers[0].capacity_blocks // 2)
        return Prefetcher(h, cap)

    @classmethod
    def load(cls, model: str = "tiny", config: EngineConfig | None = None) -> Engine:
        """A registry model (``smollm2-135m``, see ``model.registry``), a random-weight model (``tiny``,
        ``tiny-llama``, ...) or a local model folder."""
        config = config or EngineConfig()
        dtype = _DTYPES[config.dtype] if config.dtype is not None else None
        return cls(models.load(model, device=config.device, dtype=dtype, seed=config.seed), config)

    @property
    def manager(self) -> BlockManager:
        """The block manager indexing the pool (the scheduler admits through it)."""
        return self.scheduler.manager

    @manager.setter
    def manager(self, manager: BlockManager) -> None:
        if self.scheduler.num_unfinished:
            raise RequestError("cannot replace the block manager while requests are unfinished")
        self.scheduler.manager = manager

    # ---- public API ----------------------------------------------------------------------

    def publish(self, tokens: Sequence[int]) -> int:
        """Make ``tokens`` (e.g. a system prompt) a public prefix every tenant shares; returns its
        full blocks. Their KV is computed by the first request that uses them."""
        return self.manager.publish(tokens)

    def set_published(self, prefixes: Sequence[Sequence[int]]) -> list[int]:
        """Make ``prefixes`` the only public prefixes (``BlockManager.set_published``); returns each
        one's full blocks."""
        return self.manager.set_published(prefixes)

    def drain_events(self) -> list[CacheEvent]:
        return self.manager.drain_events()

    def add_request(
        self,
        tokens: Sequence[int],
        scope: Scope | str | None = None,
        params: SamplingParams | None = None,
        request_id: Hashable | None = None,
        *,
        keep_logits: bool = False,
    ) -> Hashable:
        """Queue a request; it runs from the next :meth:`step`. Bad tokens raise
        ``InvalidTokensError`` and a live duplicate id ``RequestError``, before anything changes.
        ``keep_logits``: keep each sampled position's logits on the sequence (tests, scoring)."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(tokens, (bytes, bytearray, str)) or len(tokens) == 0:
            raise InvalidTokensError(f"tokens must be a non-empty sequence of token ids, got {tokens!r:.40}")
        rid = request_id if request_id is not None else ("engine", next(self._request_ids))
        if rid in self._seqs:
            raise RequestError(f"request id {rid!r} is already in use; wait for it to finish or abort it")
        scope = as_scope(scope)
        start = self._clock()
        prompt = self.manager.hash(tokens, scope)  # validates the tokens
        snapshot = list(tokens)
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(2**62, (1,), generator=self._rng))
        seq = Seq(
            request_id=rid,
            tokens=snapshot,
            num_prompt_tokens=len(snapshot),
            scope=scope,
            params=params,
            generator=torch.Generator().manual_seed(seed),
            arrival_s=start,
            prompt=prompt,
            keep_logits=keep_logits,
        )
        seq.timings["hash_s"] = self._clock() - start
        self._seqs[rid] = seq
        self.scheduler.add(seq)
        self._start_prefetch(seq)
        return rid

    def abort(self, request_id: Hashable) -> bool:
        """Stop a request in any state and release its blocks now (written ones stay cached).
        Returns False when it had already finished."""
        seq = self._seqs.get(request_id)
        if seq is None:
            raise RequestError(f"request id {request_id!r} is unknown (never added, or finished and gone)")
        if seq.is_finished:
            return False
        self.scheduler.abort(seq)
        self._cancel_prefetch(request_id)
        return True

    def prefetch_stats(self) -> PrefetchStats:
        """Tier prefetch counters (all zero when prefetch is off)."""
        return self.prefetcher.stats() if self.prefetcher is not None else PrefetchStats()

    def close(self) -> None:
        """Stop the prefetch thread (pending jobs are cancelled). The engine stays usable, without
        prefetch."""
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
            self._prefetching.clear()

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def sequence(self, request_id: Hashable) -> Seq:
        """The live state of a request (for streams and tests)."""
        seq = self._seqs.get(request_id)
        if seq is None:
            raise RequestError(f"request id {request_id!r} is unknown (never added, or finished and gone)")
        return seq

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward over every scheduled token, sample, finish. An error from the
        model fails every sequence of the step (their written blocks stay cached) and propagates."""
        with torch.inference_mode():
            return self._step()

    def _step(self) -> list[RequestOutput]:
        self._collect()
        for rid in [r for r in self._prefetching if r not in self._seqs or self._seqs[r].is_finished]:
            self._cancel_prefetch(rid)  # ended before admission by any path (abort, stream closed)
        clock = self._clock
        t0 = clock()
        out = self.scheduler.schedule()
        outputs = [RequestOutput(s.request_id, None, True, "error", s.error) for s in out.failed]
        if not out.scheduled:
            return outputs
        t_sched = clock()
        try:
            batch = self.runner.execute(out.scheduled)
            self._sync()
        except BaseException as exc:
            for s in out.scheduled:
                if not s.seq.is_finished:
                    self.scheduler.fail(s.seq, exc)
            raise
        model_s = clock() - t_sched
        prefilling = [s.seq for s in out.scheduled if s.seq.num_computed_tokens < s.seq.num_prompt_tokens]
        for seq in prefilling:
            seq.timings["model_s"] = seq.timings.get("model_s", 0.0) + model_s
        self.scheduler.complete(out)
        for seq in prefilling:
            if seq.num_computed_tokens >= seq.num_prompt_tokens:
                self._prefill_done(seq)
        rows = [out.scheduled[j].seq for j in batch.sample_rows]
        tokens = sample(batch.logits, [q.params for q in rows], [q.generator for q in rows])
        now = clock()
        for row, (seq, token) in enumerate(zip(rows, tokens, strict=True)):
            outputs.append(self._emit(seq, token, batch.logits[row] if seq.keep_logits else None, now))
        self.step_records.append(
            StepRecord(
                batch.num_prefill_tokens,
                batch.num_decode_seqs,
                batch.num_context_tokens,
                batch.attention_work,
                clock() - t0,
                batch.forward_s,
            )
        )
        return outputs

    def stream(
        self,
        tokens: Sequence[int],
        scope: Scope | str | None = None,
        max_new_tokens: int = 16,
        request_id: Hashable | None = None,
        params: SamplingParams | None = None,
    ) -> Iterator[GenerationStep]:
        """Tokens one by one (greedy unless ``params`` say otherwise); step 0 comes right after
        prefill. Iterating drives the engine, so every other queued request advances too. Closing
        the iterator early aborts the request (its written blocks stay cached)."""
        if params is None:
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
            params = SamplingParams(max_tokens=max_new_tokens)
        rid = self.add_request(tokens, scope, params, request_id)
        self._watched.add(rid)
        return self._drain(self._seqs[rid])

    def generate(
        self,
        tokens: Sequence[int],
        scope: Scope | str | None = None,
        max_new_tokens: int = 16,
        request_id: Hashable | None = None,
        params: SamplingParams | None = None,
    ) -> Generation:
        return _collect_generation(list(self.stream(tokens, scope, max_new_tokens, request_id, params)))

    def generate_many(
        self,
        prompts: Sequence[tuple[Sequence[int], Scope | str | None]],
        params: SamplingParams | None = None,
    ) -> list[Generation]:
        """Run many requests concurrently (continuous batching); results in the order given."""
        params = params if params is not None else SamplingParams()
        seqs: list[Seq] = []
        try:
            for tokens, scope in prompts:
                rid = self.add_request(tokens, scope, params)
                self._watched.add(rid)
                seqs.append(self._seqs[rid])
            while any(not s.is_finished for s in seqs):
                self.step()
        finally:
            for seq in seqs:
                if not seq.is_finished:
                    self.scheduler.abort(seq)
                self._watched.discard(seq.request_id)
                self._seqs.pop(seq.request_id, None)
        for seq in seqs:
            if seq.error is not None:
                raise seq.error
        return [_collect_generation(list(seq.outbox)) for seq in seqs]

    def score(
        self, tokens: Sequence[int], scope: Scope | str | None = None, request_id: Hashable | None = None
    ) -> tuple[torch.Tensor, int]:
        """Next-token logits ``[vocab]`` (float32) after ``tokens`` and how many prompt tokens came
        from the cache: the prefill of :meth:`stream`, exactly, without decoding."""
        rid = self.add_request(tokens, scope, SamplingParams(max_tokens=1), request_id, keep_logits=True)
        self._watched.add(rid)
        seq = self._seqs[rid]
        for _ in self._drain(seq):
            pass
        return seq.logits[0], seq.num_cached_tokens

    def tiers_gated(self, prompt: Prompt) -> bool:
        """Whether ``prompt`` must not use the spill tiers: a share group under k-anonymity. A tier
        cannot tell how many tenants wrote a block, so a load could reveal what one tenant sent."""
        return tiers_gated(self.manager.config, prompt)

    # ---- internals -----------------------------------------------------------------------

    def _drain(self, seq: Seq) -> Iterator[GenerationStep]:
        try:
            while True:
                while seq.outbox:
                    yield seq.outbox.popleft()
                if seq.is_finished:
                    break
                self.step()
            if seq.error is not None:
                raise seq.error
        finally:
            if not seq.is_finished:
                self.scheduler.abort(seq)
            self._watched.discard(seq.request_id)
            self._seqs.pop(seq.request_id, None)

    def _collect(self) -> None:
        """Forget finished requests nobody streams (their outputs were returned by ``step``)."""
        done = [rid for rid, seq in self._seqs.items() if seq.is_finished and rid not in self._watched]
        for rid in done:
            del self._seqs[rid]

    def _emit(self, seq: Seq, token: int, logits: torch.Tensor | None, now: float) -> RequestOutput:
        index = seq.num_tokens - seq.num_prompt_tokens
        seq.tokens.append(token)
        if logits is not None:
            seq.logits.append(logits.cpu())
        timings = self._prefill_timings(seq) if index == 0 else None
        elapsed = now - seq.arrival_s
        step = GenerationStep(token, index, seq.num_prompt_tokens, seq.num_cached_tokens, elapsed, timings)
        seq.outbox.append(step)
        reason = seq.check_stop(token, self.eos_token_ids)
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return RequestOutput(seq.request_id, step, reason is not None, reason)

    def _prefill_timings(self, seq: Seq) -> PrefillTimings:
        t = seq.timings
        return PrefillTimings(
            hash_s=t.get("hash_s", 0.0),
            lookup_s=t.get("lookup_s", 0.0),
            model_s=t.get("model_s", 0.0),
            tier_s=t.get("tier_s", 0.0),
            tier_tokens=int(t.get("tier_tokens", 0)),
            queue_s=t.get("queue_s", 0.0),
        )

    def _start_prefetch(self, seq: Seq) -> None:
        """Queue the blocks this request would load from lower tiers after its pool hit."""
        prompt = seq.prompt
        if self.prefetcher is None or prompt is None or self.tiers_gated(prompt):
            return
        span = loadable_blocks(prompt, self.manager.lookup(prompt), self.block_size)
        if span and self.prefetcher.submit(seq.request_id, prompt.keys[span.start : span.stop]):
            self._prefetching.add(seq.request_id)

    def _cancel_prefetch(self, request_id: Hashable) -> None:
        if request_id in self._prefetching:
            self._prefetching.discard(request_id)
            assert self.prefetcher is not None
            self.prefetcher.cancel(request_id)

    def _settle_prefetch(
        self, request_id: Hashable, keys: Sequence[bytes]
    ) -> contextlib.AbstractContextManager[Settled]:
        if request_id not in self._prefetching:
            return contextlib.nullcontext(Settled())
        self._prefetching.discard(request_id)
        assert self.prefetcher is not None
        return self.prefetcher.settle(request_id, keys)

    def _prefill_done(self, seq: Seq) -> None:
        """Called once a sequence's prompt KV is all in the pool (subclasses write it through)."""

    def _load_prefix(self, seq: Seq, alloc: Allocation) -> int:
        """At admission: load the prefix blocks the spill tiers hold right after the pool's hit
        into the sequence's own (fresh) blocks (``prefix_load.load_prefix``), settling its prefetch
        job; returns the tokens loaded and records the time it took."""
        now = self._clock()
        t = seq.timings
        t.setdefault("queue_s", now - seq.arrival_s - t.get("hash_s", 0.0))
        prompt = seq.prompt
        assert prompt is not None
        if self.tiers is None:
            return 0
        settle = functools.partial(self._settle_prefetch, seq.request_id)
        loaded = load_prefix(self.tiers, self.pool, self.manager.config, prompt, alloc, settle)
        if not loaded.restored:
            return 0
        if loaded.num_blocks:
            self._sync()
        num_tokens = loaded.num_blocks * self.block_size
        if seq.num_cached_tokens < 0:
            t["tier_s"] = self._clock() - now
            t["tier_tokens"] = num_tokens
        return num_tokens


def _collect_generation(steps: list[GenerationStep]) -> Generation:
    first, last = steps[0], steps[-1]
    return Generation(
        prompt_tokens=first.prompt_tokens,
        cached_tokens=first.cached_tokens,
        output_tokens=[s.token_id for s in steps],
        ttft_s=first.elapsed_s,
        total_s=last.elapsed_s,
        timings=first.timings,
    )
