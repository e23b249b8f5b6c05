"""A simulated GPU worker: the engine's own scheduler and block manager, each step priced by the
latency model.

Every step the worker asks ``kvcache.engine.scheduler.Scheduler`` (the class the real engine runs,
with a ``SchedulerConfig`` of ``LatencyModel.max_num_batched_tokens`` and ``max_num_seqs``, over a
real ``BlockManager``) what runs: FCFS over waiting and running, a per-step token budget (long
prompts are chunked while others decode), a seat cap, decode growth, preemption of the newest
running sequence on a full pool (its written blocks stay cached), waits on prefix blocks another
sequence has not written yet. ``LatencyModel.step_ms`` prices the step from its shape
(``scheduler.step_shape``). Output tokens are placeholders: a prompt hashed from block ids grows
by unkeyed blocks, a token prompt by blocks keyed on the prompt's chain.

A run of identical decode steps (nothing admissible, nobody finishing, no block to allocate) goes
by in one call; a request arriving during the run cuts it at the step in progress, so the
scheduler sees it at the next step boundary exactly as if every step had been taken.

A request longer than the whole pool (its prompt and outputs) is cut: the scheduler sees the
prompt's first tokens that fit with the outputs, and the rest is computed without being cached,
priced in the step its prefill ends (the engine would refuse such a request).

The worker has no clock: the replay calls ``submit`` when a request is placed on it and
``advance`` when its work in flight ends (``busy_until_ms``; ``version`` changes whenever that
moves). Lower memory tiers plug in through ``SpillHook``: evicted keys go to ``on_evict``, the
scheduler's ``load_prefix`` callback is ``fetch`` (its transfer time is added to the step).

Not here: routing (``router``), event timing (``replay``), the scheduling rules themselves
(``engine.scheduler``), step prices (``costs``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

from kvcache.cache.config import CacheConfig
from kvcache.cache.events import CacheEvent
from kvcache.cache.manager import Allocation, BlockManager, Prompt
from kvcache.costs import LatencyModel
from kvcache.engine.sampling import SamplingParams
from kvcache.engine.scheduler import (
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    loadable_blocks,
    step_shape,
)
from kvcache.engine.sequence import Sequence
from kvcache.lab.trace import TraceRequest

PLACEHOLDER_TOKEN = 0  # every simulated token: its value is never read


class SpillHook(Protocol):
    """Lower memory tiers beside a worker's device pool (implemented by ``kvcache.tiers``)."""

    def on_evict(self, worker_id: int, keys: list[bytes], now_ms: float) -> None:
        """``keys`` just left the worker's device pool (offload them, or drop them)."""

    def fetch(
        self, worker_id: int, keys: list[bytes], now_ms: float, context_tokens: int
    ) -> tuple[int, float]:
        """Of ``keys`` (the blocks an admission may load after the device hit of
        ``context_tokens``: ``engine.scheduler.loadable_blocks``), how many leading ones lower
        tiers hold and are worth loading, and the milliseconds to load them."""

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
    start_ms: float = 0.0  # first admitted (the step it starts in)
    first_token_ms: float = 0.0
    finish_ms: float = 0.0
    cached_tokens: int = 0  # reused from the device pool at first admission
    loaded_tokens: int = 0  # loaded from lower tiers
    hit_blocks: int = 0
    query_blocks: int = 0
    prefill_tokens: int = 0  # computed


@dataclass(slots=True, eq=False)
class SimSequence(Sequence):
    """A simulated request as the scheduler sees it: ``tokens`` holds only its placeholder outputs
    and the prompt is a count (its keys are ``prompt``; its tokens are never read), so a
    50,000-token prompt costs no list of 50,000 placeholders."""

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.tokens)

    @property
    def output_tokens(self) -> list[int]:
        return list(self.tokens)

    def tokens_between(self, start: int, stop: int | None = None) -> list[int]:
        """Placeholders for the prompt's positions, then the outputs'."""
        num_prompt, num_tokens = self.num_prompt_tokens, self.num_tokens
        stop = num_tokens if stop is None else min(stop, num_tokens)
        assert start >= 0, "positions from the start of the sequence"
        in_prompt = max(0, min(stop, num_prompt) - start)
        outputs = self.tokens[max(0, start - num_prompt) : max(0, stop - num_prompt)]
        return [PLACEHOLDER_TOKEN] * in_prompt + outputs


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
        self.scheduler = Scheduler(
            self.manager,
            SchedulerConfig(latency.max_num_batched_tokens, latency.max_num_seqs),
            load_prefix=self._load_prefix,
        )
        self.jobs: dict[Hashable, Job] = {}  # waiting or running here, by request id
        self.alive = True
        self.busy_until_ms: float | None = None  # when the step (or run of steps) in flight ends
        self.version = 0  # changes whenever busy_until_ms moves
        self._out: SchedulerOutput | None = None
        self._start_ms = 0.0
        self._step_ms = 0.0
        self._num_steps = 0
        self._uncached: dict[Hashable, int] = {}  # request id -> prompt tokens cut off (never cached)
        self._params: dict[int, SamplingParams] = {}  # by max_tokens: frozen, so shared
        self._evicted: list[bytes] = []
        self._transfer_ms = 0.0
        if spill is not None:
            self.manager.set_evict_hook(lambda _block_id, key: self._evicted.append(key))

    @property
    def num_blocks(self) -> int:
        return self.manager.pool.num_blocks

    @property
    def running(self) -> list[Hashable]:
        return [s.request_id for s in self.scheduler.running]

    @property
    def waiting(self) -> list[Hashable]:
        return [s.request_id for s in self.scheduler.waiting]

    def take_events(self) -> list[CacheEvent]:
        """The pool's events since the last call (for the router's index)."""
        return self.manager.drain_events()

    def take_key_runs(self) -> list[tuple[bool, list[bytes]]]:
        """``take_events`` as runs of keys (``BlockManager.drain_key_runs``), for ``Router.on_key_runs``."""
        return self.manager.drain_key_runs()

    # ---- the replay's calls ------------------------------------------------------------------

    def submit(self, job: Job, now_ms: float) -> None:
        """Queue ``job``. An idle worker starts a step now; a run of decode steps is cut at the
        step in progress, so the scheduler considers the job at the next step boundary."""
        job.worker_id = self.worker_id
        job.attempts += 1
        self.jobs[job.request_id] = job
        self.scheduler.add(self._sequence(job))
        if self.spill is not None:
            hit = self.manager.lookup(job.prompt) // self.manager.block_size
            if hit < len(job.prompt.keys):
                self.spill.prestage(self.worker_id, job.prompt.keys[hit:], now_ms)
        if self.busy_until_ms is None:
            self._start(now_ms)
        elif self._num_steps > 1:
            begun = math.ceil((now_ms - self._start_ms) / self._step_ms) if self._step_ms > 0 else 1
            begun = max(1, begun)
            if begun < self._num_steps:
                self._num_steps = begun
                self.busy_until_ms = self._start_ms + begun * self._step_ms
                self.version += 1

    def advance(self, now_ms: float) -> list[Job]:
        """The work in flight ended at ``now_ms``: its tokens are sampled, finished jobs leave
        (their blocks stay cached) and the next step starts. Returns the finished jobs."""
        out = self._out
        assert out is not None and self.busy_until_ms == now_ms
        scheduler, jobs = self.scheduler, self.jobs
        first_token_ms = self._start_ms + self._step_ms + self.latency.request_overhead_ms
        done: list[Sequence] = []
        for seq in scheduler.complete(out):
            outputs = seq.tokens  # a SimSequence's tokens are its outputs
            outputs.append(PLACEHOLDER_TOKEN)
            num_outputs = len(outputs)
            if num_outputs == 1:  # serving time outside the engine is added to both times
                jobs[seq.request_id].first_token_ms = first_token_ms
            if num_outputs >= seq.params.max_tokens:
                done.append(seq)
        if self._num_steps > 1:  # nobody finished before the run's last step, nobody starts in it
            scheduler.skip_decode_steps(self._num_steps - 1, PLACEHOLDER_TOKEN)
            done = [s for s in scheduler.running if len(s.tokens) >= s.params.max_tokens]
        finished: list[Job] = []
        if done:
            finish_ms = now_ms + self.latency.request_overhead_ms
            for seq in done:
                scheduler.finish(seq, "length")
                job = jobs.pop(seq.request_id)
                if self._uncached:
                    self._uncached.pop(seq.request_id, None)
                job.finish_ms = finish_ms
                finished.append(job)
        self._start(now_ms)
        return finished

    def fail(self) -> list[Job]:
        """The worker is gone: every job it had (running or waiting) comes back to be re-routed."""
        self.alive = False
        order = [*self.scheduler.running, *self.scheduler.waiting]
        jobs = [self.jobs[s.request_id] for s in order]
        for seq in self.scheduler.running:
            self.manager.free(seq.request_id)
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        self.jobs.clear()
        self._out, self.busy_until_ms = None, None
        self.version += 1
        return jobs

    # ---- steps -------------------------------------------------------------------------------

    def _start(self, now_ms: float) -> None:
        """Schedule the next step at ``now_ms`` and price it (a run of them when steady)."""
        self._start_ms, self._transfer_ms = now_ms, 0.0
        scheduler = self.scheduler
        self.version += 1
        if not scheduler.running and not scheduler.waiting:  # idle: there is nothing to schedule
            self._flush_evicted(now_ms)
            self._out, self.busy_until_ms = None, None
            return
        out = scheduler.schedule()
        if self._evicted:
            self._flush_evicted(now_ms)
        for seq in out.failed:  # cannot fit even alone: lost (the replay counts it)
            del self.jobs[seq.request_id]
        scheduled = out.scheduled
        if not scheduled:
            self._out, self.busy_until_ms = None, None
            return
        shape = step_shape(scheduled)
        lat = self.latency
        step_ms = lat.step_ms(shape.num_prefill_tokens, shape.attention_work, shape.num_decode_seqs)
        if self._uncached:
            for s in scheduled:
                seq, cut = s.seq, self._uncached.get(s.seq.request_id, 0)
                if (
                    cut
                    and seq.num_computed_tokens
                    < seq.num_prompt_tokens
                    <= seq.num_computed_tokens + s.num_new_tokens
                ):
                    step_ms += lat.compute_ms(cut, seq.num_prompt_tokens)
        step_ms += self._transfer_ms
        num_steps = 1
        if shape.num_decode_seqs == len(scheduled) and scheduler.is_steady(out):  # a prefill never is
            # every sequence samples once a step: the run ends at the first one's last token
            left = min([s.params.max_tokens - len(s.tokens) for s in scheduler.running])
            if left > 1:
                num_steps = min(left, scheduler.decode_slack() + 1)
        self._out, self._step_ms, self._num_steps = out, step_ms, num_steps
        self.busy_until_ms = now_ms + num_steps * step_ms

    def _sequence(self, job: Job) -> SimSequence:
        """The scheduler's view of ``job``: its keyed prompt (cut to the pool when needed) and
        placeholder tokens."""
        req, prompt = job.request, job.prompt
        bs, num_outputs = self.manager.block_size, max(1, req.output_tokens)
        room = self.num_blocks * bs - (num_outputs - 1)  # the last output is never computed
        num_prompt = prompt.num_tokens
        if num_prompt > room:
            num_prompt = max(1, room)
            self._uncached[job.request_id] = prompt.num_tokens - num_prompt
            if req.block_ids is not None:
                ids = req.block_ids[: -(-num_prompt // bs)]
                prompt = self.manager.hash_block_ids(ids, num_prompt, prompt.scope)
            else:
                assert req.tokens is not None
                prompt = self.manager.hash(req.tokens[:num_prompt], prompt.scope)
        params = self._params.get(num_outputs)
        if params is None:
            params = self._params[num_outputs] = SamplingParams(max_tokens=num_outputs)
        return SimSequence(
            request_id=job.request_id,
            tokens=[],
            num_prompt_tokens=num_prompt,
            scope=prompt.scope,
            params=params,
            generator=None,
            arrival_s=job.arrival_ms / 1000.0,
            prompt=prompt,
        )

    # ---- the scheduler's and the pool's callbacks ----------------------------------------------

    def _load_prefix(self, seq: Sequence, alloc: Allocation) -> int:
        """At admission: the prefix lower tiers hold after the pool's hit (its transfer time is
        added to the step); the job's cache figures at its first admission."""
        bs = self.manager.block_size
        cached = alloc.num_cached_tokens
        loaded = 0
        if self.spill is not None:
            self._flush_evicted(self._start_ms)
            assert seq.prompt is not None
            span = loadable_blocks(seq.prompt, cached, bs)  # the engine's rule: whole blocks, not the last
            if span:
                keys = seq.prompt.keys[span.start : span.stop]
                num_held, transfer_ms = self.spill.fetch(self.worker_id, keys, self._start_ms, cached)
                loaded = num_held * bs
                self._transfer_ms += transfer_ms
        if not seq.num_preemptions:
            job = self.jobs[seq.request_id]
            total = job.request.num_tokens
            job.start_ms = self._start_ms
            job.cached_tokens, job.loaded_tokens = cached, loaded
            job.hit_blocks, job.query_blocks = cached // bs, total // bs
            job.prefill_tokens = total - cached - loaded
        return loaded

    def _flush_evicted(self, now_ms: float) -> None:
        if self._evicted and self.spill is not None:
            evicted, self._evicted = self._evicted, []
            self.spill.on_evict(self.worker_id, evicted, now_ms)
