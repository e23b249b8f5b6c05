"""The front's view of its workers: who is up, where, and what each caches (from Redis).

Two background loops keep the router current:

- registrations: every ``POLL_S`` the pool reads ``kvcache:workers`` and the heartbeat keys; a
  new worker (or a new *instance* of a known id, i.e. a restart) is added to the router, purging
  whatever the router believed about the earlier instance; a worker whose heartbeat expired is
  removed. A worker that fails a request is removed at once by the front (``mark_down``) and
  that instance is never re-added, even while its last heartbeat has not expired yet.
- events: the pool follows the ``kvcache:events`` stream from the point it started and hands
  each batch to ``router.on_events``. Batches from an instance that is not the current one are
  dropped, so a dead worker's late events cannot resurrect blocks it no longer has.

Redis is not trusted (see docs/serve.md, "Threat model"): a registration joins only with a valid
MAC from a worker of this deployment, signed within ``auth.REGISTRATION_MAX_AGE_S``, and only if
its hasher fingerprint equals the front's (so router keys are the worker's keys); an event batch
counts only with a valid MAC and a sequence number above the last one seen from that instance.
A worker's indexed keys never exceed the pool capacity it registered: past it the oldest are
dropped (and removed from the router), whatever a worker or a forger publishes.

When Redis is unreachable both loops wait and retry; the pool keeps the workers it knows, so
serving continues with the router's last view.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvcache.errors import AuthError, KVCacheError
from kvcache.events import BlockRemoved, BlockStored, CacheEvent
from kvcache.serve import wire
from kvcache.serve.auth import DeploymentKeys, key_check
from kvcache.serve.metrics import ServeMetrics
from kvcache.serve.worker import Registration

log = logging.getLogger("kvcache.front")
POLL_S = 0.25


@dataclass(slots=True)
class WorkerState:
    reg: Registration
    indexed_blocks: OrderedDict[bytes, None] = field(default_factory=OrderedDict)  # oldest first
    last_seq: int = -1


class WorkerPool:
    """Workers by id, kept in step with Redis; owns the router's ``add/remove_worker`` calls."""

    def __init__(self, router: Any, metrics: ServeMetrics, redis_url: str | None,
                 on_change: Callable[[], None] | None = None, *, keys: DeploymentKeys) -> None:  # fmt: skip
        self.router = router
        self.keys = keys
        self.metrics = metrics
        self.redis_url = redis_url
        self.workers: dict[str, WorkerState] = {}
        self.on_change = on_change
        self.redis_up = False
        self.dead_instances: set[str] = set()  # failed a request: never re-added from a stale heartbeat
        self.changed = asyncio.Event()
        self._refused: dict[str, bytes] = {}  # worker id -> the registration value last refused

    @property
    def first(self) -> Registration | None:
        return next(iter(self.workers.values())).reg if self.workers else None

    def add(self, reg: Registration) -> None:
        known = self.workers.get(reg.worker_id)
        if (known is not None and known.reg.instance == reg.instance) or reg.instance in self.dead_instances:
            return
        first = self.first
        if first is not None and (first.model_id, first.block_size) != (reg.model_id, reg.block_size):
            log.error("worker %s serves %s/block %d; this front serves %s/block %d: ignored", reg.worker_id,
                      reg.model_id, reg.block_size, first.model_id, first.block_size)  # fmt: skip
            return
        mine = key_check(self.keys.hasher(block_size=reg.block_size, model_id=reg.model_id,
                                          adapter_id=reg.adapter_id))  # fmt: skip
        if reg.key_check != mine:
            log.error("worker %s keys blocks differently from this front (another deployment secret, "
                      "model or adapter): ignored", reg.worker_id)  # fmt: skip
            return
        if known is not None:
            self.router.remove_worker(reg.worker_id)  # a restart: forget the old instance's blocks
        self.router.add_worker(reg.worker_id)
        self.workers[reg.worker_id] = WorkerState(reg)
        self.metrics.indexed.labels(reg.worker_id).set(0)
        self._changed()
        log.info("worker %s joined at %s (instance %s)", reg.worker_id, reg.url, reg.instance)

    def mark_down(self, worker_id: str, instance: str | None = None, failed: bool = False) -> None:
        state = self.workers.get(worker_id)
        if state is None or (instance is not None and state.reg.instance != instance):
            return
        if failed:
            self.dead_instances.add(state.reg.instance)
        del self.workers[worker_id]
        self.router.remove_worker(worker_id)
        self.metrics.indexed.labels(worker_id).set(0)
        self._changed()
        log.warning("worker %s removed", worker_id)

    def _changed(self) -> None:
        self.metrics.workers.set(len(self.workers))
        self.changed.set()
        self.changed = asyncio.Event()
        if self.on_change is not None:
            self.on_change()

    def apply_events(self, fields: dict[bytes, bytes]) -> None:
        """One stream entry ``{worker, instance, seq, events, mac}``: verified, bounded, applied."""
        try:
            worker_id, instance = fields[b"worker"].decode(), fields[b"instance"].decode()
            seq, data, mac = int(fields[b"seq"]), fields[b"events"], fields[b"mac"]
        except (KeyError, ValueError) as exc:
            log.error("dropped a malformed event entry (%s)", type(exc).__name__)
            return
        state = self.workers.get(worker_id)
        if state is None or state.reg.instance != instance:
            return
        if not self.keys.check_events(worker_id, instance, seq, data, mac):
            log.error("dropped an event batch for %s whose MAC does not verify", worker_id)
            return
        if seq <= state.last_seq:
            log.error("dropped a replayed event batch for %s (seq %d <= %d)", worker_id, seq, state.last_seq)
            return
        state.last_seq = seq
        try:
            events = wire.decode_events(data)
        except KVCacheError as exc:
            log.error("dropped a malformed event batch from %s: %s", worker_id, exc)
            return
        self.router.on_events(worker_id, self._bounded(state, events))
        self.metrics.indexed.labels(worker_id).set(len(state.indexed_blocks))

    @staticmethod
    def _bounded(state: WorkerState, events: list[CacheEvent]) -> list[CacheEvent]:
        """``events`` plus a ``BlockRemoved`` for each oldest key pushed past the worker's capacity."""
        indexed, cap = state.indexed_blocks, state.reg.num_blocks
        out: list[CacheEvent] = []
        for event in events:
            out.append(event)
            if isinstance(event, BlockStored):
                indexed[event.key] = None
                indexed.move_to_end(event.key)
                while len(indexed) > cap:
                    old, _ = indexed.popitem(last=False)
                    out.append(BlockRemoved(old, 0, ""))
            elif isinstance(event, BlockRemoved):
                indexed.pop(event.key, None)
        return out

    async def _sync_registrations(self, client: Any) -> None:
        regs = await client.hgetall(wire.WORKERS_KEY)
        refused, now_refused = self._refused, {}
        alive = {}
        for raw_id, raw in regs.items():
            worker_id = raw_id.decode()
            beat = await client.get(wire.alive_key(worker_id))
            alive[worker_id] = beat.decode() if beat is not None else None
            try:
                reg = Registration.from_json(self.keys.open_registration(raw, time.time()))
                if reg.worker_id != worker_id:
                    raise AuthError(f"registration of {reg.worker_id!r} stored under {worker_id!r}")
            except (ValueError, KeyError, TypeError, AuthError) as exc:
                if refused.get(worker_id) != raw:  # each refused value is logged once, not every poll
                    log.error("registration for %r refused: %s", worker_id, exc)
                now_refused[worker_id] = raw
                continue
            if alive[worker_id] == reg.instance:
                self.add(reg)
        self._refused = now_refused
        for worker_id, state in list(self.workers.items()):
            if alive.get(worker_id) != state.reg.instance:
                self.mark_down(worker_id, state.reg.instance)

    async def run(self) -> None:
        """Follow registrations and events until cancelled."""
        import redis.asyncio as aioredis

        assert self.redis_url is not None
        client: Any = aioredis.Redis.from_url(self.redis_url, socket_timeout=2.0, socket_connect_timeout=1.0)
        last_id = "$"
        next_poll = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if last_id == "$":
                    info = await client.xinfo_stream(wire.EVENTS_STREAM) if await client.exists(
                        wire.EVENTS_STREAM) else None  # fmt: skip
                    last_id = info["last-generated-id"].decode() if info else "0-0"
                if loop.time() >= next_poll:
                    await self._sync_registrations(client)
                    next_poll = loop.time() + POLL_S
                    self.redis_up = True
                reply = await client.xread({wire.EVENTS_STREAM: last_id}, count=512, block=int(POLL_S * 1000))
                for _stream, entries in reply or []:
                    for entry_id, fields in entries:
                        last_id = entry_id.decode()
                        self.apply_events(fields)
            except asyncio.CancelledError:
                await client.aclose()
                raise
            except Exception as exc:  # Redis down: keep the workers we know and retry
                if self.redis_up:
                    log.warning("redis unavailable (%s); routing on the last known view", type(exc).__name__)
                self.redis_up = False
                await asyncio.sleep(POLL_S)
