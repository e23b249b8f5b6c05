"""Routing policies: pure functions from (per-worker overlap, per-worker load, request) to a
worker id, chosen by name from ``POLICIES``.

A policy sees a ``RoutingInput`` (the request's size and one ``WorkerView`` per live worker,
with what the router believes: prefix overlap in blocks, active requests and blocks, prefill
work routed there and not yet done) and returns one of the views' worker ids. Ties break
through the seeded ``rng`` in the input, never towards the lowest id, so idle workers share
load. Nothing here keeps state; the router owns the index and the load accounting.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvcache.router.latency import LatencyModel


@dataclass(frozen=True, slots=True)
class WorkerView:
    """The router's belief about one worker when a request arrives."""

    worker_id: int
    overlap_blocks: int  # leading blocks of the request it holds
    active_requests: int  # routed there, not finished
    active_blocks: int  # blocks those requests hold
    pending_prefill_tokens: int  # prompt tokens routed there whose prefill has not finished
    queued_prefill_ms: float  # modelled wait before a new request's prefill starts (queue, slots)
    held_blocks: int = 0  # distinct full blocks those requests use (shared prefixes counted once)
    reported_requests: int = 0  # running + waiting as the worker last reported (lags; all fronts')


@dataclass(frozen=True, slots=True)
class RoutingInput:
    num_tokens: int
    block_size: int
    workers: Sequence[WorkerView]
    latency: LatencyModel
    turn: int  # requests routed before this one
    rng: random.Random
    capacity_blocks: int | None = None  # each worker's pool, when the router knows it
    mean_service_ms: float = 0.0  # observed mean time from routing to finishing (0: none yet)

    def new_tokens(self, view: WorkerView) -> int:
        """Prompt tokens the worker would compute, given its overlap (at least one, as engines do)."""
        return max(1, self.num_tokens - view.overlap_blocks * self.block_size)

    @property
    def num_blocks(self) -> int:
        return -(-self.num_tokens // self.block_size)


Policy = Callable[[RoutingInput], int]


def argmin(inp: RoutingInput, cost: Callable[[WorkerView], float | tuple[float, ...]]) -> int:
    """The worker of lowest cost; equal costs break by the seeded rng."""
    costs = [(cost(v), v.worker_id) for v in inp.workers]
    best = min(c for c, _ in costs)
    tied = [w for c, w in costs if c == best]
    return tied[0] if len(tied) == 1 else inp.rng.choice(tied)


def round_robin(inp: RoutingInput) -> int:
    """Worker ``turn mod n``: ignores cache and load."""
    return inp.workers[inp.turn % len(inp.workers)].worker_id


def random_choice(inp: RoutingInput) -> int:
    """A uniformly random worker (seeded)."""
    return inp.rng.choice(inp.workers).worker_id


def least_loaded(inp: RoutingInput) -> int:
    """Fewest active requests, then least pending prefill; ignores cache."""
    return argmin(inp, lambda v: (v.active_requests, v.pending_prefill_tokens))


def lpm(inp: RoutingInput) -> int:
    """Pure longest prefix match: the most leading blocks cached; ties random. Ignores load,
    which is why it piles every request sharing a first block onto one worker."""
    return argmin(inp, lambda v: -v.overlap_blocks)


def make_dynamo(overlap_weight: float = 1.0, temperature: float = 0.0) -> Policy:
    """NVIDIA Dynamo's KV router cost.

    Source: NVIDIA Dynamo documentation, "KV Router", section "Cost Function"
    (docs.nvidia.com/dynamo, components/router; ai-dynamo/dynamo ``lib/llm/src/kv_router``):
    ``cost = kv_overlap_score_weight x prefill_blocks + decode_blocks``, lowest wins;
    prefill blocks are the worker's pending prefill tokens plus this request's uncached ones,
    over the block size; active (decode) blocks are the worker's plus this request's. With
    ``temperature > 0`` the worker is sampled from ``softmax(-normalized_logit / temperature)``
    (logits min-max normalized), else the minimum is taken (ties random).
    """

    def dynamo(inp: RoutingInput) -> int:
        bs = inp.block_size

        def logit(v: WorkerView) -> float:
            prefill_blocks = (v.pending_prefill_tokens + inp.new_tokens(v)) / bs
            decode_blocks = v.active_blocks + inp.num_blocks
            return overlap_weight * prefill_blocks + decode_blocks

        if temperature <= 0:
            return argmin(inp, logit)
        logits = [logit(v) for v in inp.workers]
        lo, hi = min(logits), max(logits)
        span = hi - lo or 1.0
        weights = [math.exp(-(x - lo) / span / temperature) for x in logits]
        return inp.rng.choices([v.worker_id for v in inp.workers], weights)[0]

    return dynamo


def make_sglang(
    balance_abs_threshold: int = 64, balance_rel_threshold: float = 1.5, cache_threshold: float = 0.3
) -> Policy:
    """SGLang gateway (sgl-router) cache-aware policy.

    Source: sgl-project/sglang, the sgl-router cache-aware policy (``cache_aware.rs``, router
    README for the thresholds; recent releases default ``cache_threshold`` to 0.3, older ones
    to 0.5): the system is imbalanced when ``max_load - min_load > balance_abs_threshold`` and
    ``max_load > min_load x balance_rel_threshold`` (load = running requests); then the least
    loaded worker wins. Otherwise the worker with the highest prefix match ratio wins if that
    ratio exceeds ``cache_threshold``, else the least loaded (the gateway's own fallback picks
    the worker with the smallest cache tree; load is the fallback this project specifies).
    """

    def sglang(inp: RoutingInput) -> int:
        loads = [v.active_requests for v in inp.workers]
        hi, lo = max(loads), min(loads)
        if hi - lo > balance_abs_threshold and hi > lo * balance_rel_threshold:
            return argmin(inp, lambda v: v.active_requests)
        best = max(v.overlap_blocks for v in inp.workers)
        ratio = best * inp.block_size / inp.num_tokens
        if best and ratio > cache_threshold:
            return argmin(inp, lambda v: (-v.overlap_blocks, v.active_requests))
        return argmin(inp, lambda v: v.active_requests)

    return sglang


def make_lpm_balanced(balance_abs_threshold: int = 32, balance_rel_threshold: float = 1.5) -> Policy:
    """Longest prefix match behind SGLang's load guard.

    The guard is the one SGLang's gateway applies before its cache-aware choice
    (sgl-project/sglang, sgl-model-gateway ``src/policies/cache_aware.rs``): when the request
    counts are imbalanced, ``max - min > balance_abs_threshold`` and ``max > min x
    balance_rel_threshold``, the least loaded worker wins. Otherwise the longest precise
    prefix match wins (no match-ratio threshold; equal matches go to the less loaded worker).
    32 is ``CacheAwareConfig::default()``'s absolute threshold (``src/policies/mod.rs``; the
    gateway's command line defaults to 64), 1.5 the command line's relative one (the library
    default is 1.1).
    """

    def lpm_balanced(inp: RoutingInput) -> int:
        loads = [v.active_requests for v in inp.workers]
        hi, lo = max(loads), min(loads)
        if hi - lo > balance_abs_threshold and hi > lo * balance_rel_threshold:
            return argmin(inp, lambda v: v.active_requests)
        return argmin(inp, lambda v: (-v.overlap_blocks, v.active_requests))

    return lpm_balanced


def make_affinity(
    recompute_weight: float = 0.0, memory_weight: float = 8.0, locality_slack: float = 0.5
) -> Policy:
    """kvcache's policy: the lowest modelled TTFT, then the longest prefix among near-ties.

    ``cost = queued_prefill_ms + memory_wait_ms + (1 + recompute_weight) x prefill_ms(new,
    cached, active)``, three terms the router can estimate for each worker:

    - ``queued_prefill_ms``: the router's modelled wait before this request's prefill could
      start there: prefill work already routed there and not done and, when the worker's
      ``max_num_seqs`` slots are all taken, the modelled finish (prefill plus decode steps) of
      the request whose slot it would take; a worker that serves one request at a time
      (``max_num_seqs=1``) thus charges the whole service time of every request ahead;
    - ``memory_wait_ms`` (when the router knows the pool size): the routed, unfinished
      requests use ``held_blocks`` distinct blocks; if those plus the blocks this request
      lacks exceed the pool, it waits for blocks to be freed: ``memory_weight x
      mean_service_ms x excess / capacity_blocks``, where ``mean_service_ms`` is the
      routed-to-finished time the router observes online. Queues of long prompts in small
      pools wait for memory, not for compute, and a prefill estimate alone misses it;
    - ``prefill_ms(new, cached, active)``: this request's own prefill of the tokens the worker
      lacks, slowed by the decode batch it shares steps with; ``recompute_weight`` > 0 would
      also charge the delay recomputation imposes on later requests (0 by default: in the
      benchmark matrix any positive weight bought hits in long-context cells with a
      collapsed tail).

    Then locality: among the workers whose cost is within ``locality_slack`` x the request's
    full (uncached) prefill time of the lowest, the one holding the longest prefix wins
    (lowest cost among equals, seeded random among exact ties). Cost estimates differ by more
    than this noise only when the queues really differ; inside it, keeping a prefix's
    traffic together keeps it cached (tenant system prompts, documents, sessions) instead of
    copying it into every pool. A shared first block never outweighs a real queue, so a
    common system prompt cannot pile traffic onto one worker.

    In the spirit of Mooncake's Conductor (lowest estimated TTFT = queue + prefill; Qin et al.,
    FAST'25) and Preble's E2 (exploit a long match unless load says explore). The defaults
    were chosen on the benchmark matrix's shapes (docs/router.md) and are the same for
    every trace.
    """

    def affinity(inp: RoutingInput) -> int:
        lat = inp.latency
        slots = lat.max_num_seqs
        cap = inp.capacity_blocks if memory_weight > 0 else None
        service = inp.mean_service_ms

        def cost(v: WorkerView) -> float:
            new = inp.new_tokens(v)
            cached = inp.num_tokens - new
            prefill = lat.prefill_ms(new, cached, min(v.active_requests, slots - 1))
            wait = v.queued_prefill_ms
            if cap and service:
                excess = v.held_blocks + inp.num_blocks - v.overlap_blocks - cap
                if excess > 0:
                    wait += memory_weight * service * excess / cap
            return wait + (1.0 + recompute_weight) * prefill

        if locality_slack <= 0:
            return argmin(inp, cost)
        costs = {v.worker_id: cost(v) for v in inp.workers}
        bound = min(costs.values()) + locality_slack * lat.prefill_ms(inp.num_tokens, 0, 0)
        near = [v for v in inp.workers if costs[v.worker_id] <= bound]
        longest = max(v.overlap_blocks for v in near)
        near = [v for v in near if v.overlap_blocks == longest]
        return argmin(dataclasses.replace(inp, workers=near), lambda v: costs[v.worker_id])

    return affinity


POLICIES: dict[str, Policy] = {
    "round_robin": round_robin,
    "random": random_choice,
    "least_loaded": least_loaded,
    "lpm": lpm,
    "dynamo": make_dynamo(),
    "sglang": make_sglang(),
    "lpm_balanced": make_lpm_balanced(),
    "affinity": make_affinity(),
}
BASELINES = ("round_robin", "random", "least_loaded", "lpm", "dynamo", "sglang", "lpm_balanced")
