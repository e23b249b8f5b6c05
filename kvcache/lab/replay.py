"""Discrete-event replay: a trace's requests arrive at their timestamps, a ``Router`` places
them, simulated ``SimWorker``s schedule them step by step (the engine's scheduler) on a virtual
clock.

Events are (time, sequence) ordered, so a replay is deterministic for a given seed: the same
trace, config and seed give the same placement and the same latencies on every machine.
Worker events reach the router ``event_delay_ms`` after they happen (precise mode). A worker
failure (``failures``) removes the worker at its time; everything it had, queued or running,
is re-routed (keeping its arrival time, so the restart shows in its TTFT) and nothing is lost.

Metrics are ``report``'s job; this module returns the jobs with their timings.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from tqdm import tqdm

from kvcache.cache.config import DEFAULT_BLOCK_SIZE, CacheConfig
from kvcache.cache.manager import BlockManager, Prompt
from kvcache.costs import LatencyModel
from kvcache.errors import ConfigError
from kvcache.lab.sim_worker import Job, SimWorker, SpillHook
from kvcache.lab.trace import Trace
from kvcache.router.policies import POLICIES
from kvcache.router.router import Router, RouteRequest

_ARRIVE, _EVENTS, _FAIL, _STEP = range(4)


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """One replay: ``num_workers`` workers of ``capacity_blocks`` blocks, one policy."""

    num_workers: int
    capacity_blocks: int
    policy: str = "affinity"
    mode: str = "precise"
    event_delay_ms: float = 0.0
    ttl_ms: float = 120_000.0
    latency: LatencyModel = field(default_factory=LatencyModel)
    seed: int = 0
    failures: tuple[tuple[int, float], ...] = ()  # (worker id, seconds)

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"num_workers={self.num_workers} must be >= 1")
        if self.capacity_blocks < 1:
            raise ConfigError(f"capacity_blocks={self.capacity_blocks} must be >= 1")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy={self.policy!r} is unknown; choose one of {sorted(POLICIES)}")
        if self.event_delay_ms < 0:
            raise ConfigError(f"event_delay_ms={self.event_delay_ms} must be >= 0")
        failed = [w for w, _ in self.failures]
        for w in failed:
            if not 0 <= w < self.num_workers:
                raise ConfigError(f"cannot fail worker {w}: workers are 0..{self.num_workers - 1}")
        if len(set(failed)) == self.num_workers:
            raise ConfigError("every worker would fail; keep at least one alive")


@dataclass(slots=True)
class ReplayResult:
    config: ReplayConfig
    jobs: list[Job]  # in arrival order, all finished
    num_rerouted: int
    num_lost: int
    wall_s: float


def prepare(trace: Trace, block_size: int) -> list[Prompt]:
    """Every request's block keys, hashed once (keys depend only on the hashing config)."""
    hasher = BlockManager(CacheConfig(num_blocks=1, block_size=block_size))
    prompts = []
    for req in trace.requests:
        if req.block_ids is not None:
            prompts.append(hasher.hash_block_ids(req.block_ids, req.num_tokens, "default"))
        else:
            assert req.tokens is not None
            prompts.append(hasher.hash(req.tokens, req.tenant))
    return prompts


class _Replay:
    def __init__(
        self,
        trace: Trace,
        prompts: Sequence[Prompt],
        block_size: int,
        config: ReplayConfig,
        spill: SpillHook | None,
    ) -> None:
        self.config = config
        self.now = 0.0
        self.heap: list[tuple[float, int, int, object, object]] = []
        self.seq = 0
        self.router = Router(
            config.policy,
            config.mode,
            block_size,
            latency=config.latency,
            ttl_ms=config.ttl_ms,
            capacity_blocks=config.capacity_blocks,
            seed=config.seed,
            clock=lambda: self.now,
        )
        self.workers = [
            SimWorker(w, config.capacity_blocks, block_size, config.latency, spill)
            for w in range(config.num_workers)
        ]
        for w in range(config.num_workers):
            self.router.add_worker(w)
        self.jobs = [
            Job(i, f"r{i}", req, prompts[i], req.timestamp_ms) for i, req in enumerate(trace.requests)
        ]
        self.done = 0
        self.rerouted = 0
        self.pushed = [0] * config.num_workers  # the worker version whose step end is queued

    def push(self, t: float, kind: int, a: object, b: object = None) -> None:
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))
        self.seq += 1

    def send_events(self, worker_id: int, runs: list[tuple[bool, list[bytes]]]) -> None:
        """A worker's pool events (as runs of keys) reach the router, ``event_delay_ms`` later."""
        if not runs:
            return
        if self.config.event_delay_ms:
            self.push(self.now + self.config.event_delay_ms, _EVENTS, worker_id, runs)
        else:
            self.router.on_key_runs(worker_id, runs)

    def route(self, job: Job) -> None:
        r = job.request
        req = RouteRequest(job.request_id, job.prompt.keys, r.num_tokens, job.prompt.scope, r.output_tokens)
        w = cast(int, self.router.route(req))  # the replay numbers its workers 0..n-1
        self.workers[w].submit(job, self.now)
        self.settle(w)

    def settle(self, w: int) -> None:
        """Forward the worker's pool events and queue the end of its work in flight if it moved."""
        worker = self.workers[w]
        runs = worker.take_key_runs()
        if runs:
            self.send_events(w, runs)
        version = worker.version
        if worker.busy_until_ms is not None and version != self.pushed[w]:
            self.pushed[w] = version
            heapq.heappush(self.heap, (worker.busy_until_ms, self.seq, _STEP, w, version))
            self.seq += 1

    def run(self, progress: bool) -> None:
        for job in self.jobs:
            self.push(job.arrival_ms, _ARRIVE, job)
        for w, seconds in self.config.failures:
            self.push(seconds * 1000.0, _FAIL, w)
        # disable=None: no bar when stderr is not a terminal (a redirected log)
        bar = tqdm(
            total=len(self.jobs),
            desc=self.config.policy,
            unit="req",
            leave=False,
            disable=None if progress else True,
        )
        heap = self.heap
        workers = self.workers
        while heap:
            self.now, _, kind, a, b = heapq.heappop(heap)
            if kind == _STEP:
                assert isinstance(a, int)
                worker = workers[a]
                if worker.alive and worker.version == b:
                    for job in worker.advance(self.now):
                        self.router.on_finished(job.request_id)
                        self.done += 1
                        bar.update()
                    self.settle(a)
            elif kind == _ARRIVE:
                assert isinstance(a, Job)
                self.route(a)
            elif kind == _EVENTS:
                assert isinstance(a, int) and isinstance(b, list)
                self.router.on_key_runs(a, b)
            else:
                assert isinstance(a, int)
                self.fail(a)
        bar.close()

    def fail(self, w: int) -> None:
        worker = self.workers[w]
        if not worker.alive:
            return
        jobs = sorted(worker.fail(), key=lambda j: j.index)
        self.router.remove_worker(w)
        for job in jobs:
            self.rerouted += 1
            self.route(job)


def replay(
    trace: Trace,
    config: ReplayConfig,
    *,
    block_size: int | None = None,
    prompts: Sequence[Prompt] | None = None,
    spill: SpillHook | None = None,
    progress: bool = False,
) -> ReplayResult:
    """Replay ``trace`` under ``config``. ``block_size`` defaults to the trace's block tokens
    (Mooncake) or ``DEFAULT_BLOCK_SIZE`` (token traces); pass ``prompts`` from ``prepare`` to hash
    only once."""
    bs = block_size or trace.block_tokens or DEFAULT_BLOCK_SIZE
    if trace.block_tokens is not None and bs != trace.block_tokens:
        raise ConfigError(
            f"block_size={bs} differs from the trace's {trace.block_tokens} tokens per block id"
        )
    if prompts is None:
        prompts = prepare(trace, bs)
    start = time.perf_counter()
    sim = _Replay(trace, prompts, bs, config, spill)
    sim.run(progress)
    lost = len(sim.jobs) - sim.done
    return ReplayResult(config, sim.jobs, sim.rerouted, lost, time.perf_counter() - start)
