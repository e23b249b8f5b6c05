"""The router a server embeds: add workers, route requests, feed worker events back.

    router = Router(policy="affinity", mode="precise", block_size=16)
    for w in range(4):
        router.add_worker(w)
    worker_id = router.route(RouteRequest("req-1", prompt.keys, prompt.num_tokens, "acme"))
    router.on_events(worker_id, manager.drain_events())   # precise mode learns from events
    router.on_finished("req-1")                           # releases the worker's load

It keeps two things: an index of which worker holds which block key (``index``) and its own
load accounting (requests and blocks routed to each worker and not finished, and a modelled
schedule per worker built from the latency model: a request's estimated prefill starts when the
previous estimate ends and, on a worker whose ``max_num_seqs`` sequence slots are all taken,
when the earliest modelled finish frees one; a request is modelled to finish ``output_tokens - 1``
decode steps after its prefill). It never reads a worker's internals; what a worker reports of
its own load (``observe_load``) is passed to policies beside the router's count, and floors it
(``WorkerView.in_flight_requests``): requests other routers placed count. Policies get
the per-worker figures as columns the router updates where a load changes (a route, a finish,
a report, a modelled prefill end), so routing costs array operations over the fleet, not a
Python step per worker. Choosing is the policy's job (``policies``); simulating workers is
``kvcache.lab.replay``'s. ``capacity_blocks`` (each worker's pool size, if known) bounds what
the index believes of a worker: in precise mode it never holds more of a worker's keys than
that, dropping the least recently stored first (``add_worker`` takes a worker's own size), and
in approximate mode it forgets what a worker must have evicted.

The router owns the one index of which workers hold which keys: ``kvcache serve``'s front
(``serve.pool``) and ``kvcache route`` (``vllm.proxy``) apply their workers' events to it. Not
here: the index itself (``index``), transports and their trust checks.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvcache.cache.config import DEFAULT_BLOCK_SIZE
from kvcache.cache.events import CacheEvent
from kvcache.cache.tenancy import Scope
from kvcache.costs import LatencyModel
from kvcache.errors import ConfigError, RequestError
from kvcache.router.index import ApproxIndex, PreciseIndex
from kvcache.router.policies import (
    POLICIES,
    Policy,
    RoutingInput,
    WorkerColumns,
    WorkerId,
    WorkerView,
    WorkerViews,
)

MODES = ("precise", "approx")


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What the router needs of a request: its block keys (from ``BlockManager.hash`` or
    ``hash_block_ids``, same config as the workers), its length and its scope."""

    request_id: Hashable
    block_keys: Sequence[bytes]
    num_tokens: int
    scope: Scope | str | None = None
    output_tokens: int = 1  # tokens it will decode (max_tokens); 1 = unknown, priced as prefill only


@dataclass(slots=True)
class _Load:
    active: dict[Hashable, int] = field(default_factory=dict)  # request -> blocks
    active_blocks: int = 0
    prefill_free_ms: float = 0.0  # when the modelled prefill queue empties
    pending: deque[tuple[float, int]] = field(default_factory=deque)  # (est. prefill end, tokens)
    pending_tokens: int = 0
    held: dict[bytes, int] = field(default_factory=dict)  # block key -> active requests using it
    keys_of: dict[Hashable, Sequence[bytes]] = field(default_factory=dict)
    finish_ms: dict[Hashable, float] = field(default_factory=dict)  # request -> modelled finish
    reported: int = 0  # running + waiting, as the worker last reported (``observe_load``)

    def start_ms(self, now: float, slots: int) -> float:
        """When a request routed now could start its prefill: after the modelled prefills ahead
        of it and, with every sequence slot taken, after the finish that frees one."""
        start = max(now, self.prefill_free_ms)
        over = len(self.finish_ms) - slots
        if over >= 0:
            start = max(start, heapq.nsmallest(over + 1, self.finish_ms.values())[-1])
        return start

    def memory_free_ms(self, excess: int, now: float) -> float:
        """When the routed requests modelled to finish first have freed ``excess`` blocks (each
        frees the blocks it was charged); ``now`` when nothing must be freed, the last modelled
        finish when they never would."""
        freed, free_at = 0, now
        if excess > 0:
            for request_id, end in sorted(self.finish_ms.items(), key=lambda item: item[1]):
                freed, free_at = freed + self.active[request_id], end
                if freed >= excess:
                    break
        return free_at


_COUNTS = ("active_requests", "active_blocks", "pending_prefill_tokens", "held_blocks", "reported_requests")


def _monotonic_ms() -> float:
    return time.monotonic() * 1000.0


class Router:
    """Routes requests to workers by a named policy over a prefix index and load."""

    def __init__(
        self,
        policy: str | Policy = "affinity",
        mode: str = "precise",
        block_size: int = DEFAULT_BLOCK_SIZE,
        *,
        latency: LatencyModel | None = None,
        ttl_ms: float = 120_000.0,
        capacity_blocks: int | None = None,
        seed: int = 0,
        clock: Callable[[], float] = _monotonic_ms,
    ) -> None:
        if isinstance(policy, str):
            if policy not in POLICIES:
                raise ConfigError(f"policy={policy!r} is unknown; choose one of {sorted(POLICIES)}")
            self.policy_name, self.policy = policy, POLICIES[policy]
        else:
            self.policy_name, self.policy = getattr(policy, "__name__", "custom"), policy
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is unknown; choose 'precise' (events) or 'approx' (TTL)")
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"block_size={block_size!r} must be a positive integer")
        if ttl_ms <= 0:
            raise ConfigError(f"ttl_ms={ttl_ms} must be > 0")
        self.mode = mode
        self.block_size = block_size
        self.latency = latency or LatencyModel()
        self.index: PreciseIndex | ApproxIndex = (
            PreciseIndex(capacity_blocks) if mode == "precise" else ApproxIndex(ttl_ms, capacity_blocks)
        )
        self.clock = clock
        self.rng = random.Random(seed)
        self.loads: dict[WorkerId, _Load] = {}
        self.where: dict[Hashable, WorkerId] = {}  # active request -> worker
        self.routed_at: dict[Hashable, float] = {}
        self.capacity_blocks = capacity_blocks
        self.mean_service_ms = 0.0  # EWMA of routed -> finished, the time a request holds its blocks
        self.num_routed = 0
        # What policies read of each worker, as columns in ``loads`` order, kept up to date where
        # a _Load changes, so a route costs array operations rather than a Python step per worker.
        self._pos: dict[WorkerId, int] = {}
        self._ids = np.empty(0, dtype=object)
        self._cols = {name: np.zeros(0, dtype=np.int64) for name in _COUNTS}
        self._prefill_free = np.zeros(0, dtype=np.float64)
        self._full: set[WorkerId] = set()  # workers whose sequence slots are all taken
        self._wake: list[tuple[float, int, WorkerId, _Load]] = []  # (prefill end, seq, worker, load)
        self._slot_at = np.zeros(0, dtype=np.int64)  # position -> the worker's precise index slot
        self._seq = itertools.count()

    @property
    def workers(self) -> list[WorkerId]:
        return list(self.loads)

    def add_worker(self, worker_id: WorkerId, capacity_blocks: int | None = None) -> None:
        """Route to ``worker_id`` from now on. ``capacity_blocks``: its pool size, if it differs
        from the router's, bounding what the precise index holds for it (approximate mode
        bounds every worker by the router's)."""
        if worker_id in self.loads:
            raise ConfigError(f"worker {worker_id} is already added")
        # validated before anything changes; -1: approximate mode has no slots
        slot = (
            self.index.add_worker(worker_id, capacity_blocks) if isinstance(self.index, PreciseIndex) else -1
        )
        self.loads[worker_id] = _Load()
        self._pos[worker_id] = len(self._ids)
        ids = np.empty(len(self._ids) + 1, dtype=object)
        ids[:-1], ids[-1] = self._ids, worker_id
        self._ids = ids
        self._cols = {name: np.append(col, 0) for name, col in self._cols.items()}
        self._prefill_free = np.append(self._prefill_free, 0.0)
        self._slot_at = np.append(self._slot_at, slot)

    def remove_worker(self, worker_id: WorkerId) -> list[Hashable]:
        """Forget a worker (its index entries and load); returns its unfinished request ids."""
        load = self.loads.pop(worker_id, None)
        if load is None:
            raise ConfigError(f"worker {worker_id} is not known to the router")
        self.index.remove_worker(worker_id)
        i = self._pos.pop(worker_id)
        self._ids = np.delete(self._ids, i)
        self._cols = {name: np.delete(col, i) for name, col in self._cols.items()}
        self._prefill_free = np.delete(self._prefill_free, i)
        self._slot_at = np.delete(self._slot_at, i)
        self._pos = {w: j for j, w in enumerate(self.loads)}
        self._full.discard(worker_id)
        for request_id in load.active:
            del self.where[request_id]
            del self.routed_at[request_id]
        return list(load.active)

    def observe_load(self, worker_id: WorkerId, num_requests: int) -> None:
        """The requests a worker reports it runs and queues (from every front, not only this
        router's), shown to policies as ``WorkerView.reported_requests``; load-aware policies
        price ``WorkerView.in_flight_requests``, the router's own ``active_requests`` floored by
        it, so requests this router did not place count. A floor, not a sum: a report lags the
        worker by a Redis round trip, and adding it would count a request twice (routed here
        and reported) or again after this router saw it finish."""
        load = self.loads.get(worker_id)
        if load is not None:
            load.reported = num_requests
            self._cols["reported_requests"][self._pos[worker_id]] = num_requests

    def request_counts(self, worker_id: WorkerId) -> tuple[int, int]:
        """A worker's ``(active_requests, reported_requests)``: routed here and not finished, and
        running + waiting as it last reported (``observe_load``; 0 before any report)."""
        load = self.loads.get(worker_id)
        if load is None:
            raise ConfigError(f"worker {worker_id} is not known to the router")
        return len(load.active), load.reported

    def _sync(self, worker_id: WorkerId, load: _Load) -> None:
        """Copy ``load``'s figures into the columns (after it changed)."""
        i, cols = self._pos[worker_id], self._cols
        cols["active_requests"][i] = len(load.active)
        cols["active_blocks"][i] = load.active_blocks
        cols["pending_prefill_tokens"][i] = load.pending_tokens
        cols["held_blocks"][i] = len(load.held)
        self._prefill_free[i] = load.prefill_free_ms
        if len(load.finish_ms) >= self.latency.max_num_seqs:
            self._full.add(worker_id)
        else:
            self._full.discard(worker_id)

    def _expire_pending(self, now: float) -> None:
        """Prefills modelled to have ended by ``now`` stop counting as pending. Each worker's
        queue ends in routing order, so waking on the earliest end pops exactly its due head."""
        wake = self._wake
        while wake and wake[0][0] <= now:
            _, _, worker_id, load = heapq.heappop(wake)
            if self.loads.get(worker_id) is not load:
                continue  # removed (and maybe added again since)
            pending = load.pending
            while pending and pending[0][0] <= now:
                load.pending_tokens -= pending.popleft()[1]
            self._cols["pending_prefill_tokens"][self._pos[worker_id]] = load.pending_tokens

    def _columns(self, request: RouteRequest, now: float) -> WorkerColumns:
        self._expire_pending(now)
        pos = self._pos
        if isinstance(self.index, PreciseIndex):
            overlap = self.index.overlap_by_slot(request.block_keys, now)[self._slot_at]
        else:
            overlap = np.zeros(len(self._ids), dtype=np.int64)
            for w, n in self.index.overlaps(request.block_keys, now).items():  # matching only
                i = pos.get(w)
                if i is not None:
                    overlap[i] = n
        queued = np.maximum(self._prefill_free, now) - now
        for w in self._full:
            queued[pos[w]] = self.loads[w].start_ms(now, self.latency.max_num_seqs) - now
        cols = self._cols
        return WorkerColumns(
            self._ids,
            overlap,
            cols["active_requests"],
            cols["active_blocks"],
            cols["pending_prefill_tokens"],
            queued,
            cols["held_blocks"],
            cols["reported_requests"],
        )

    def _release_wait(self, excess: np.ndarray, now: float) -> np.ndarray:
        """Per worker, the modelled ms from ``now`` until the requests routed there that finish
        first (``finish_ms``) have freed ``excess`` blocks (each frees the blocks it was charged);
        0 where ``excess`` <= 0, the last modelled finish where they never would."""
        wait = np.zeros(len(excess), dtype=np.float64)
        ids = self._ids
        for i in np.flatnonzero(excess > 0).tolist():
            wait[i] = max(0.0, self.loads[ids[i]].memory_free_ms(int(excess[i]), now) - now)
        return wait

    def _views(self, request: RouteRequest, now: float) -> list[WorkerView]:
        """What a policy would be shown for ``request`` at ``now``, one view per worker."""
        return list(WorkerViews(self._columns(request, now)))

    def route(self, request: RouteRequest) -> WorkerId:
        """Choose a worker for ``request`` and count it against that worker until ``on_finished``."""
        if not self.loads:
            raise ConfigError("the router has no workers; call add_worker(worker_id) first")
        if request.request_id in self.where:
            raise RequestError(f"request id {request.request_id!r} is already routed; finish it first")
        if not isinstance(request.output_tokens, int) or request.output_tokens < 1:
            raise RequestError(
                f"request {request.request_id!r}: output_tokens={request.output_tokens!r} must be an "
                "integer >= 1 (the tokens it decodes)"
            )
        if request.num_tokens < 1 or len(request.block_keys) > -(-request.num_tokens // self.block_size):
            raise RequestError(
                f"request {request.request_id!r}: num_tokens={request.num_tokens} with "
                f"{len(request.block_keys)} block keys of {self.block_size} tokens is inconsistent"
            )
        now = self.clock()
        columns = self._columns(request, now)
        inp = RoutingInput(
            request.num_tokens,
            self.block_size,
            WorkerViews(columns),
            self.latency,
            self.num_routed,
            self.rng,
            self.capacity_blocks,
            self.mean_service_ms,
            request.output_tokens,
            request.block_keys,
            lambda excess: self._release_wait(excess, now),
        )
        worker_id = self.policy(inp)
        if worker_id not in self._pos:
            raise ConfigError(f"policy {self.policy_name!r} chose {worker_id!r}, which is not a worker")
        view = columns.view(self._pos[worker_id])  # read before _charge changes the columns
        self._charge(worker_id, request, inp, view, now)
        if isinstance(self.index, ApproxIndex):
            self.index.record(worker_id, request.block_keys, now)
        self.num_routed += 1
        return worker_id

    def _charge(
        self, worker_id: WorkerId, request: RouteRequest, inp: RoutingInput, view: WorkerView, now: float
    ) -> None:
        load = self.loads[worker_id]
        new = inp.new_tokens(view)
        lat = self.latency
        running = min(view.in_flight_requests, lat.max_num_seqs - 1)
        prefill = lat.prefill_ms(new, request.num_tokens - new, running)
        load.prefill_free_ms = load.start_ms(now, lat.max_num_seqs) + prefill
        load.finish_ms[request.request_id] = load.prefill_free_ms + (
            request.output_tokens - 1
        ) * lat.decode_step_ms(running + 1)
        load.pending.append((load.prefill_free_ms, new))
        load.pending_tokens += new
        heapq.heappush(self._wake, (load.prefill_free_ms, next(self._seq), worker_id, load))
        blocks = inp.num_blocks
        load.active[request.request_id] = blocks
        load.active_blocks += blocks
        load.keys_of[request.request_id] = request.block_keys
        held = load.held
        for key in request.block_keys:
            held[key] = held.get(key, 0) + 1
        self.where[request.request_id] = worker_id
        self.routed_at[request.request_id] = now
        self._sync(worker_id, load)

    def on_events(self, worker_id: WorkerId, events: Sequence[CacheEvent]) -> None:
        """A worker's block stored/removed events, in order (precise mode; ignored in approx
        mode); past the worker's capacity the index drops its least recently stored keys."""
        if worker_id not in self.loads:
            return  # a removed worker's late events
        if isinstance(self.index, PreciseIndex):
            self.index.apply(worker_id, events)

    def on_key_runs(self, worker_id: WorkerId, runs: Sequence[tuple[bool, Sequence[bytes]]]) -> None:
        """``on_events`` given the events' keys as runs, ``(True, keys)`` stored and ``(False, keys)``
        removed, in order (``BlockManager.drain_key_runs``): the same index change, no records."""
        if worker_id in self.loads and isinstance(self.index, PreciseIndex):
            self.index.apply_keys(worker_id, runs)

    def on_finished(self, request_id: Hashable) -> None:
        """The request is done (or abandoned): its worker's load goes down."""
        worker_id = self.where.pop(request_id, None)
        if worker_id is None:
            raise RequestError(f"request id {request_id!r} is not routed (unknown or already finished)")
        load = self.loads[worker_id]
        load.active_blocks -= load.active.pop(request_id)
        del load.finish_ms[request_id]
        held = load.held
        for key in load.keys_of.pop(request_id):
            if held[key] == 1:
                del held[key]
            else:
                held[key] -= 1
        self._sync(worker_id, load)
        held_ms = self.clock() - self.routed_at.pop(request_id)
        # A slow EWMA: the policy needs the typical time blocks stay held, not the last one.
        self.mean_service_ms = (
            held_ms if not self.mean_service_ms else 0.98 * self.mean_service_ms + 0.02 * held_ms
        )
