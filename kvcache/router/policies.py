"""Routing policies: pure functions from (per-worker overlap, per-worker load, request) to a
worker id, chosen by name from ``POLICIES``.

A policy sees a ``RoutingInput`` (the request's size and one ``WorkerView`` per live worker,
with what the router believes: prefix overlap in blocks, active requests and blocks, prefill
work routed there and not yet done, the worker's own report of its requests) and returns one of
the views' worker ids. Load-aware policies count a worker's requests as ``in_flight_requests``,
the router's own count floored by the worker's report (requests other fronts placed count;
without reports, as in a replay, it is the router's count). Ties break
through the seeded ``rng`` in the input, never towards the lowest id, so idle workers share
load. Nothing here keeps state; the router owns the index and the load accounting.

The same views also come as columns (``WorkerColumns``, one numpy array per field, from
``RoutingInput.columns()``): the built-in policies compute each worker's cost over the columns,
the same float operations in the same order as the per-view formula, so a route costs a few
array operations rather than Python work per worker. The router hands its columns over as
they are and builds a ``WorkerView`` only when a policy reads one.

Besides the baselines and ``affinity`` (the default), the registry holds the candidates that
``benches/router_heldout.py`` judges on held-out workload shapes (exploit/explore, bounded-load
hashing, Dynamo's cost with a locality band, sampling among near-ties, output blocks in the
footprint, Dynamo's decode load in affinity's cost); none is a default.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from kvcache.cache.hashing import checksum
from kvcache.costs import LatencyModel
from kvcache.errors import ConfigError

# A worker's id as the caller names it: ints in the replay, worker names in serve, (host, port)
# pairs; the router only hashes and compares ids for equality.
WorkerId = Hashable


@dataclass(frozen=True, slots=True)
class WorkerView:
    """The router's belief about one worker when a request arrives."""

    worker_id: WorkerId
    overlap_blocks: int  # leading blocks of the request it holds
    active_requests: int  # routed there, not finished
    active_blocks: int  # blocks those requests hold
    pending_prefill_tokens: int  # prompt tokens routed there whose prefill has not finished
    queued_prefill_ms: float  # modelled wait before a new request's prefill starts (queue, slots)
    held_blocks: int = 0  # distinct full blocks those requests use (shared prefixes counted once)
    reported_requests: int = 0  # running + waiting as the worker last reported (lags; all fronts')

    @property
    def in_flight_requests(self) -> int:
        """The requests the worker is believed to hold, what load-aware policies price: this
        router's own count, floored by the worker's last report, so requests another front (or
        anyone else) placed there count too. A floor, not a sum: a request this router routed is
        in both figures once the worker reports it."""
        return max(self.active_requests, self.reported_requests)


@dataclass(frozen=True, slots=True)
class WorkerColumns:
    """``WorkerView``'s fields as arrays, one entry per worker in the same order."""

    worker_id: np.ndarray  # dtype object: the ids as the caller gave them
    overlap_blocks: np.ndarray  # int64, like every count here
    active_requests: np.ndarray
    active_blocks: np.ndarray
    pending_prefill_tokens: np.ndarray
    queued_prefill_ms: np.ndarray  # float64
    held_blocks: np.ndarray
    reported_requests: np.ndarray

    @classmethod
    def of(cls, views: Sequence[WorkerView]) -> WorkerColumns:
        ids = np.empty(len(views), dtype=object)
        for i, v in enumerate(views):  # one by one: a tuple id must not become a row
            ids[i] = v.worker_id

        def col(name: str, dtype: type) -> np.ndarray:
            return np.array([getattr(v, name) for v in views], dtype=dtype)

        return cls(
            ids,
            col("overlap_blocks", np.int64),
            col("active_requests", np.int64),
            col("active_blocks", np.int64),
            col("pending_prefill_tokens", np.int64),
            col("queued_prefill_ms", np.float64),
            col("held_blocks", np.int64),
            col("reported_requests", np.int64),
        )

    def view(self, i: int) -> WorkerView:
        return WorkerView(
            self.worker_id[i],
            int(self.overlap_blocks[i]),
            int(self.active_requests[i]),
            int(self.active_blocks[i]),
            int(self.pending_prefill_tokens[i]),
            float(self.queued_prefill_ms[i]),
            int(self.held_blocks[i]),
            int(self.reported_requests[i]),
        )

    def in_flight_requests(self) -> np.ndarray:
        """``WorkerView.in_flight_requests`` of every worker."""
        floored: np.ndarray = np.maximum(self.active_requests, self.reported_requests)
        return floored


class WorkerViews(Sequence[WorkerView]):
    """Views over columns, each built when it is read (a policy that reads one pays for one)."""

    def __init__(self, columns: WorkerColumns) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns.worker_id)

    @overload
    def __getitem__(self, i: int) -> WorkerView: ...
    @overload
    def __getitem__(self, i: slice) -> list[WorkerView]: ...
    def __getitem__(self, i: int | slice) -> WorkerView | list[WorkerView]:
        if isinstance(i, slice):
            return [self.columns.view(j) for j in range(len(self))[i]]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.columns.view(i % len(self))

    def __iter__(self) -> Iterator[WorkerView]:
        return (self.columns.view(i) for i in range(len(self)))


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
    output_tokens: int = 1  # tokens the request will decode (1: unknown)
    block_keys: Sequence[bytes] = ()  # the request's block keys (the router's, not copied)
    # Per worker, the modelled ms until the requests routed there that finish first free the
    # given number of blocks (0 where it is <= 0); None when the router models no schedule.
    release_wait: Callable[[np.ndarray], np.ndarray] | None = None

    def new_tokens(self, view: WorkerView) -> int:
        """Prompt tokens the worker would compute, given its overlap (at least one, as engines do)."""
        return max(1, self.num_tokens - view.overlap_blocks * self.block_size)

    @property
    def num_blocks(self) -> int:
        return -(-self.num_tokens // self.block_size)

    def columns(self) -> WorkerColumns:
        """The workers' views as columns (the router's own, or built from the views given)."""
        if isinstance(self.workers, WorkerViews):
            return self.workers.columns
        return WorkerColumns.of(self.workers)

    def new_tokens_column(self, cols: WorkerColumns) -> np.ndarray:
        """``new_tokens`` of every worker."""
        new: np.ndarray = np.maximum(1, self.num_tokens - cols.overlap_blocks * self.block_size)
        return new


Policy = Callable[[RoutingInput], WorkerId]


def argmin(inp: RoutingInput, cost: Callable[[WorkerView], float | tuple[float, ...]]) -> WorkerId:
    """The worker of lowest cost; equal costs break by the seeded rng."""
    costs = [(cost(v), v.worker_id) for v in inp.workers]
    best = min(c for c, _ in costs)
    tied = [w for c, w in costs if c == best]
    return tied[0] if len(tied) == 1 else inp.rng.choice(tied)


def argmin_columns(
    inp: RoutingInput, cols: WorkerColumns, *keys: np.ndarray, among: np.ndarray | None = None
) -> WorkerId:
    """``argmin`` over columns: the lowest ``keys`` (compared in order, as tuples are) among the
    workers ``among`` selects (all by default); equal keys break by the seeded rng, drawing
    from the tied ids in worker order exactly as ``argmin`` does."""
    idx = np.arange(len(cols.worker_id)) if among is None else np.flatnonzero(among)
    for key in keys:
        k = key[idx]
        idx = idx[k == k.min()]
    tied: list[Any] = cols.worker_id[idx].tolist()
    return tied[0] if len(tied) == 1 else inp.rng.choice(tied)  # type: ignore[no-any-return]


def round_robin(inp: RoutingInput) -> WorkerId:
    """Worker ``turn mod n``: ignores cache and load."""
    return inp.workers[inp.turn % len(inp.workers)].worker_id


def random_choice(inp: RoutingInput) -> WorkerId:
    """A uniformly random worker (seeded)."""
    return inp.rng.choice(inp.workers).worker_id


def least_loaded(inp: RoutingInput) -> WorkerId:
    """Fewest requests in flight, then least pending prefill; ignores cache."""
    cols = inp.columns()
    return argmin_columns(inp, cols, cols.in_flight_requests(), cols.pending_prefill_tokens)


def lpm(inp: RoutingInput) -> WorkerId:
    """Pure longest prefix match: the most leading blocks cached; ties random. Ignores load,
    which is why it piles every request sharing a first block onto one worker."""
    cols = inp.columns()
    return argmin_columns(inp, cols, -cols.overlap_blocks)


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

    def dynamo(inp: RoutingInput) -> WorkerId:
        cols = inp.columns()
        prefill_blocks = (cols.pending_prefill_tokens + inp.new_tokens_column(cols)) / inp.block_size
        decode_blocks = cols.active_blocks + inp.num_blocks
        logit = overlap_weight * prefill_blocks + decode_blocks
        if temperature <= 0:
            return argmin_columns(inp, cols, logit)
        logits: list[float] = logit.tolist()
        lo, hi = min(logits), max(logits)
        span = hi - lo or 1.0
        weights = [math.exp(-(x - lo) / span / temperature) for x in logits]
        return inp.rng.choices(cols.worker_id.tolist(), weights)[0]  # type: ignore[no-any-return]

    return dynamo


def make_sglang(
    balance_abs_threshold: int = 64, balance_rel_threshold: float = 1.5, cache_threshold: float = 0.3
) -> Policy:
    """SGLang gateway (sgl-router) cache-aware policy.

    Source: sgl-project/sglang, the sgl-router cache-aware policy (``cache_aware.rs``, router
    README for the thresholds; recent releases default ``cache_threshold`` to 0.3, older ones
    to 0.5): the system is imbalanced when ``max_load - min_load > balance_abs_threshold`` and
    ``max_load > min_load x balance_rel_threshold`` (load = requests in flight); then the least
    loaded worker wins. Otherwise the worker with the highest prefix match ratio wins if that
    ratio exceeds ``cache_threshold``, else the least loaded (the gateway's own fallback picks
    the worker with the smallest cache tree; load is the fallback this project specifies).
    """

    def sglang(inp: RoutingInput) -> WorkerId:
        cols = inp.columns()
        loads = cols.in_flight_requests()
        hi, lo = int(loads.max()), int(loads.min())
        if hi - lo > balance_abs_threshold and hi > lo * balance_rel_threshold:
            return argmin_columns(inp, cols, loads)
        best = int(cols.overlap_blocks.max())
        ratio = best * inp.block_size / inp.num_tokens
        if best and ratio > cache_threshold:
            return argmin_columns(inp, cols, -cols.overlap_blocks, loads)
        return argmin_columns(inp, cols, loads)

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

    def lpm_balanced(inp: RoutingInput) -> WorkerId:
        cols = inp.columns()
        loads = cols.in_flight_requests()
        hi, lo = int(loads.max()), int(loads.min())
        if hi - lo > balance_abs_threshold and hi > lo * balance_rel_threshold:
            return argmin_columns(inp, cols, loads)
        return argmin_columns(inp, cols, -cols.overlap_blocks, loads)

    return lpm_balanced


def ttft_cost_column(
    inp: RoutingInput,
    cols: WorkerColumns,
    recompute_weight: float = 0.0,
    memory_weight: float = 8.0,
    output_blocks: int = 0,
    modelled_release: bool = False,
) -> np.ndarray:
    """``affinity``'s modelled TTFT of the request on every worker: ``queued_prefill_ms +
    memory_wait_ms + (1 + recompute_weight) x prefill_ms(new, cached, active)`` (the terms are
    described at ``make_affinity``). ``output_blocks`` more blocks count in the memory wait's
    footprint, for the blocks the request's output will fill. With ``modelled_release`` the
    memory wait is the router's modelled schedule instead (``RoutingInput.release_wait``: until
    the requests finishing first free the excess), and the prefill starts after the later of
    the queue and the memory wait."""
    lat = inp.latency
    slots = lat.max_num_seqs
    cap = inp.capacity_blocks if memory_weight > 0 else None
    service = inp.mean_service_ms
    new = inp.new_tokens_column(cols)
    running = np.minimum(cols.in_flight_requests(), slots - 1)
    prefill = lat.prefill_ms(new, inp.num_tokens - new, running)  # every worker's, elementwise
    wait = cols.queued_prefill_ms
    if modelled_release:
        if inp.capacity_blocks and inp.release_wait is not None:
            need = inp.num_blocks + output_blocks - inp.capacity_blocks
            wait = np.maximum(wait, inp.release_wait(cols.held_blocks - cols.overlap_blocks + need))
    elif cap and service:
        excess = cols.held_blocks + inp.num_blocks + output_blocks - cols.overlap_blocks - cap
        wait = np.where(excess > 0, wait + memory_weight * service * excess / cap, wait)
    cost: np.ndarray = wait + (1.0 + recompute_weight) * prefill
    return cost


def nearest_longest(inp: RoutingInput, cols: WorkerColumns, cost: np.ndarray, band: float) -> WorkerId:
    """Among the workers whose ``cost`` is within ``band`` of the lowest, the one holding the
    longest prefix (lowest cost among equals, seeded random among exact ties); with ``band`` <= 0,
    the lowest cost."""
    if band <= 0:
        return argmin_columns(inp, cols, cost)
    near = cost <= cost.min() + band
    longest = cols.overlap_blocks[near].max()
    return argmin_columns(inp, cols, cost, among=near & (cols.overlap_blocks == longest))


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
    - ``prefill_ms(new, cached, in_flight)``: this request's own prefill of the tokens the worker
      lacks, slowed by the decode batch it shares steps with (the requests in flight there);
      ``recompute_weight`` > 0 would also charge the delay recomputation imposes on later
      requests (0 by default: in the benchmark matrix any positive weight bought hits in
      long-context cells with a collapsed tail).

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

    def affinity(inp: RoutingInput) -> WorkerId:
        cols = inp.columns()
        cost = ttft_cost_column(inp, cols, recompute_weight, memory_weight)
        return nearest_longest(inp, cols, cost, locality_slack * inp.latency.prefill_ms(inp.num_tokens, 0, 0))

    return affinity


# ---- candidates for the default (benches/router_heldout.py judges them on held-out shapes) ----


def make_exploit_explore(exploit_ratio: float = 0.5) -> Policy:
    """Preble's E2 (Srivatsa et al., 2024): exploit a long match, otherwise explore by load.

    When the longest prefix any worker holds covers more than ``exploit_ratio`` of the prompt
    (Preble's rule: the cached part is longer than the part to compute), the request goes to
    a worker holding that prefix, the one of lowest modelled TTFT (``ttft_cost_column``) among
    them; otherwise to the worker of lowest modelled TTFT, match or not. No band: a long match
    wins whatever the queue behind it.
    """

    def exploit_explore(inp: RoutingInput) -> WorkerId:
        cols = inp.columns()
        cost = ttft_cost_column(inp, cols)
        longest = cols.overlap_blocks.max()
        if longest and longest * inp.block_size > exploit_ratio * inp.num_tokens:
            return argmin_columns(inp, cols, cost, among=cols.overlap_blocks == longest)
        return argmin_columns(inp, cols, cost)

    return exploit_explore


def make_bounded_hash(load_factor: float = 1.25, key_blocks: int = 1) -> Policy:
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, SODA 2018).

    A request's home key is its ``key_blocks``-th block key (its first block by default: the
    scope is in the root of the chain, so a tenant's or a suite's prompt has one home); shorter
    requests use their last full block, and one with no full block goes to the least loaded
    worker. Each worker ranks by ``checksum(key || repr(worker_id))`` (rendezvous hashing: every
    key gets its own order of all workers, which adding or removing a worker changes only
    where it stood). The first worker in that order whose in-flight requests, counting this one,
    stay within ``ceil(load_factor x (total active + 1) / workers)`` wins: a full home spills
    to the key's next worker. Ignores overlap and queues; deterministic, no tie-break needed.
    """
    if load_factor < 1 or key_blocks < 1:
        raise ConfigError(f"load_factor={load_factor} must be >= 1 and key_blocks={key_blocks} >= 1")

    def bounded_hash(inp: RoutingInput) -> WorkerId:
        cols = inp.columns()
        if not inp.block_keys:
            return argmin_columns(inp, cols, cols.in_flight_requests(), cols.pending_prefill_tokens)
        key = inp.block_keys[min(key_blocks, len(inp.block_keys)) - 1]
        ids = cols.worker_id.tolist()
        rank = np.array([checksum(key + repr(w).encode()) for w in ids], dtype=np.uint64)
        loads = cols.in_flight_requests()
        cap = math.ceil(load_factor * (int(loads.sum()) + 1) / len(ids))
        order = np.argsort(rank, kind="stable")[::-1]  # highest rank first
        fits = order[loads[order] + 1 <= cap]
        # never empty: the least loaded has at most floor(total / n) <= ceil((total + 1) / n) - 1
        home: WorkerId = ids[int(fits[0])]
        return home

    return bounded_hash


def make_dynamo_band(overlap_weight: float = 1.0, locality_slack: float = 0.5) -> Policy:
    """Dynamo's cost with affinity's locality band: ``logit = overlap_weight x prefill_blocks +
    decode_blocks`` as ``make_dynamo`` states it; among the workers whose logit is within
    ``locality_slack x overlap_weight x`` the request's blocks (its full prefill, in the
    logit's units) of the lowest, the longest prefix wins (lowest logit among equals)."""

    def dynamo_band(inp: RoutingInput) -> WorkerId:
        cols = inp.columns()
        prefill_blocks = (cols.pending_prefill_tokens + inp.new_tokens_column(cols)) / inp.block_size
        logit = overlap_weight * prefill_blocks + cols.active_blocks + inp.num_blocks
        return nearest_longest(inp, cols, logit, locality_slack * overlap_weight * inp.num_blocks)

    return dynamo_band


def make_affinity_softmax(locality_slack: float = 0.5, temperature: float = 0.25) -> Policy:
    """Affinity's cost and band, sampled: a worker within ``locality_slack`` x the request's full
    prefill time of the lowest cost is drawn (seeded rng) with weight ``exp(-(cost - lowest) /
    band / temperature)``, so near-ties share traffic instead of all going to the longest
    prefix; outside the band, never."""
    if temperature <= 0:
        raise ConfigError(f"temperature={temperature} must be > 0 (0 is make_affinity's rule)")

    def affinity_softmax(inp: RoutingInput) -> WorkerId:
        cols = inp.columns()
        cost = ttft_cost_column(inp, cols)
        lo = cost.min()
        band = locality_slack * inp.latency.prefill_ms(inp.num_tokens, 0, 0)
        near = np.flatnonzero(cost <= lo + band)
        if len(near) == 1:
            alone: WorkerId = cols.worker_id[int(near[0])]
            return alone
        weights = np.exp(-(cost[near] - lo) / band / temperature).tolist()
        return inp.rng.choices(cols.worker_id[near].tolist(), weights)[0]  # type: ignore[no-any-return]

    return affinity_softmax


def make_affinity_output(locality_slack: float = 0.5) -> Policy:
    """Affinity with the request's output in its memory footprint: the blocks its
    ``output_tokens`` will fill count with the blocks it lacks in the memory wait, so a long
    answer is priced where the pool is nearly committed."""

    def affinity_output(inp: RoutingInput) -> WorkerId:
        cols = inp.columns()
        output_blocks = -(-(inp.num_tokens + inp.output_tokens - 1) // inp.block_size) - inp.num_blocks
        cost = ttft_cost_column(inp, cols, output_blocks=output_blocks)
        return nearest_longest(inp, cols, cost, locality_slack * inp.latency.prefill_ms(inp.num_tokens, 0, 0))

    return affinity_output


def make_affinity_decode(decode_weight: float = 1.0, locality_slack: float = 0.5) -> Policy:
    """Affinity's modelled TTFT plus Dynamo's decode load: ``decode_weight x active_blocks``
    priced as the prefill time of that many blocks (Dynamo weighs a decode block as a prefill
    block), so workers holding long transcripts are avoided before their pools fill; then
    affinity's band (``locality_slack`` x the request's full prefill time), longest prefix
    inside it."""

    def affinity_decode(inp: RoutingInput) -> WorkerId:
        cols = inp.columns()
        block_ms = inp.block_size * inp.latency.prefill_ms_per_token
        cost = ttft_cost_column(inp, cols) + decode_weight * block_ms * cols.active_blocks
        return nearest_longest(inp, cols, cost, locality_slack * inp.latency.prefill_ms(inp.num_tokens, 0, 0))

    return affinity_decode


def make_affinity_release(locality_slack: float = 0.5) -> Policy:
    """Affinity whose memory wait is modelled, not weighted: where the routed, unfinished
    requests and this one's missing blocks exceed the pool, the prefill starts once the
    requests modelled to finish first have freed the excess (the engine admits a request when
    its blocks fit), or after the modelled queue if that is later. No constant to choose."""

    def affinity_release(inp: RoutingInput) -> WorkerId:
        cols = inp.columns()
        cost = ttft_cost_column(inp, cols, modelled_release=True)
        return nearest_longest(inp, cols, cost, locality_slack * inp.latency.prefill_ms(inp.num_tokens, 0, 0))

    return affinity_release


POLICIES: dict[str, Policy] = {
    "round_robin": round_robin,
    "random": random_choice,
    "least_loaded": least_loaded,
    "lpm": lpm,
    "dynamo": make_dynamo(),
    "sglang": make_sglang(),
    "lpm_balanced": make_lpm_balanced(),
    "affinity": make_affinity(),
    "exploit_explore": make_exploit_explore(),
    "bounded_hash": make_bounded_hash(),
    "dynamo_band": make_dynamo_band(),
    "affinity_softmax": make_affinity_softmax(),
    "affinity_output": make_affinity_output(),
    "affinity_decode": make_affinity_decode(),
    "affinity_release": make_affinity_release(),
}
BASELINES = ("round_robin", "random", "least_loaded", "lpm", "dynamo", "sglang", "lpm_balanced")
# The baselines and the default: what "all" means on the command line (``kvcache replay``,
# ``kvcache matrix``); the candidates are replayed only by name.
COMPARED = (*BASELINES, "affinity")
