"""A simulated GPU worker: a real block manager, a request queue, batching limits and a
latency model.

The worker admits requests first come first served: the head of the queue starts when the
prefill engine is idle, fewer than ``max_num_seqs`` sequences run, and its blocks can be
allocated (reusing its cached prefix); otherwise it waits. Prefills run one at a time; decoding
sequences overlap. A request's blocks stay referenced until it finishes, then stay cached until
evicted. A prompt longer than the whole pool caches only its first ``num_blocks`` blocks and
computes the rest without caching it.

The worker only changes state when the replay calls it (``submit``, ``try_start``,
``prefill_done``, ``finish``); it has no clock. Routing is not here (``router``), nor event
timing (``replay``). Lower memory tiers plug in through ``SpillHook``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from kvcache.cache.config import CacheConfig
from kvcache.cache.events import BlockRemoved, CacheEvent
from kvcache.cache.manager import BlockManager, Prompt
from kvcache.costs import LatencyModel
from kvcache.lab.trace import TraceRequest


class SpillHook(Protocol):
    """Lower memory tiers beside a worker's device pool (implemented by ``kvcache.tiers``)."""

    def on_evict(self, worker_id: int, keys: list[bytes], now_ms: float) -> None:
        """``keys`` just left the worker's device pool (offload them, or drop them)."""

    def fetch(self, worker_id: int, keys: list[bytes], now_ms: float) -> tuple[int, float]:
        """Of ``keys`` (the prompt's blocks after the device hit), how many leading ones lower
        tiers hold, and the milliseconds to load them."""

    def prestage(self, worker_id: int, keys: list[bytes], now_ms: float) -> None:
        """A request needing ``keys`` (its blocks after the device's current hit) was just placed
        on the worker: start moving those the slow tiers hold towards it, ahead of ``fetch``."""


@dataclass(slots=True)
class Job:
    """One request's life in the replay; the result fields are filled in as it runs."""

    index: int
    request_id: str
    request: TraceRequest
    prompt: Prompt
    arrival_ms: float
    worker_id: int = -1
    attempts: int = 0
    start_ms: float = 0.0
    first_token_ms: float = 0.0
    finish_ms: float = 0.0
    cached_tokens: int = 0  # reused from the device pool
    loaded_tokens: int = 0  # loaded from lower tiers
    hit_blocks: int = 0
    query_blocks: int = 0
    prefill_tokens: int = 0  # computed


@dataclass(slots=True)
class Started:
    """A job the worker just admitted: when its prefill ends and what its pool emitted."""

    job: Job
    prefill_done_ms: float
    events: list[CacheEvent] = field(default_factory=list)


class SimWorker:
    """One simulated GPU worker with ``num_blocks`` KV blocks of ``block_size`` tokens."""

    def __init__(
        self,
        worker_id: int,
        num_blocks: int,
        block_size: int,
        latency: LatencyModel,
        spill: SpillHook | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.manager = BlockManager(CacheConfig(num_blocks=num_blocks, block_size=block_size))
        self.latency = latency
        self.spill = spill
        self.queue: deque[Job] = deque()
        self.running: dict[str, Job] = {}  # prefilling or decoding
        self.prefilling: Job | None = None
        self.alive = True

    @property
    def num_blocks(self) -> int:
        return self.manager.pool.num_blocks

    def submit(self, job: Job, now_ms: float = 0.0) -> None:
        job.worker_id = self.worker_id
        job.attempts += 1
        self.queue.append(job)
        if self.spill is not None:
            hit = self.manager.lookup(job.prompt) // self.manager.block_size
            if hit < len(job.prompt.keys):
                self.spill.prestage(self.worker_id, list(job.prompt.keys[hit:]), now_ms)

    def _fit(self, job: Job) -> Prompt:
        """The job's prompt, cut to the pool size when the whole pool could not hold it."""
        prompt, bs, n = job.prompt, self.manager.block_size, self.num_blocks
        if -(-prompt.num_tokens // bs) <= n:
            return prompt
        req = job.request
        if req.block_ids is not None:
            return self.manager.hash_block_ids(req.block_ids[:n], n * bs, prompt.scope)
        assert req.tokens is not None
        return self.manager.hash(req.tokens[: n * bs], prompt.scope)

    def try_start(self, now_ms: float) -> Started | None:
        """Admit the head of the queue if the prefill engine, a sequence slot and its blocks
        are free; returns None (and changes nothing) otherwise."""
        if self.prefilling is not None or not self.queue or len(self.running) >= self.latency.max_num_seqs:
            return None
        job = self.queue[0]
        prompt = self._fit(job)
        alloc = self.manager.try_allocate(job.request_id, prompt)
        if alloc is None:
            return None  # blocks are held by running requests; retried when one finishes
        self.queue.popleft()
        bs = self.manager.block_size
        total = job.request.num_tokens
        cached = alloc.num_cached_tokens
        events = self.manager.drain_events()
        transfer_ms = 0.0
        loaded = 0
        if self.spill is not None:
            evicted = [e.key for e in events if isinstance(e, BlockRemoved)]
            if evicted:
                self.spill.on_evict(self.worker_id, evicted, now_ms)
            rest = prompt.keys[cached // bs :]
            if rest:
                num_held, transfer_ms = self.spill.fetch(self.worker_id, rest, now_ms)
                loaded = max(0, min(num_held * bs, total - 1 - cached))
        job.cached_tokens = cached
        job.loaded_tokens = loaded
        job.hit_blocks = cached // bs
        job.query_blocks = total // bs
        job.prefill_tokens = total - cached - loaded
        job.start_ms = now_ms
        self.prefilling = job
        self.running[job.request_id] = job
        num_decoding = len(self.running) - 1
        prefill = self.latency.prefill_ms(job.prefill_tokens, cached + loaded, num_decoding)
        return Started(job, now_ms + transfer_ms + prefill, events)

    def prefill_done(self, job: Job, now_ms: float) -> float:
        """The job's first token is out; returns when its last token will be."""
        assert self.prefilling is job
        self.prefilling = None
        job.first_token_ms = now_ms + self.latency.request_overhead_ms  # serving time outside the engine
        steps = job.request.output_tokens - 1
        return now_ms + steps * self.latency.decode_step_ms(len(self.running))

    def finish(self, job: Job, now_ms: float) -> list[CacheEvent]:
        """The job is done: its blocks are released (they stay cached until evicted)."""
        del self.running[job.request_id]
        self.manager.free(job.request_id)
        job.finish_ms = now_ms + self.latency.request_overhead_ms
        return self.manager.drain_events()

    def fail(self) -> list[Job]:
        """The worker is gone: every job it had (queued or running) comes back to be re-routed."""
        self.alive = False
        jobs = [*self.running.values(), *self.queue]
        for job in self.running.values():
            self.manager.free(job.request_id)
        self.running.clear()
        self.queue.clear()
        self.prefilling = None
        return jobs
