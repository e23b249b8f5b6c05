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

When Redis is unreachable both loops wait and retry; the pool keeps the workers it knows, so
serving continues with the router's last view.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvcache.errors import KVCacheError
from kvcache.events import BlockRemoved, BlockStored
from kvcache.serve import wire
from kvcache.serve.metrics import ServeMetrics
from kvcache.serve.worker import Registration

log = logging.getLogger("kvcache.front")
POLL_S = 0.25


@dataclass(slots=True)
class WorkerState:
    reg: Registration
    indexed_blocks: set[bytes] = field(default_factory=set)


class WorkerPool:
    """Workers by id, kept in step with Redis; owns the router's ``add/remove_worker`` calls."""

    def __init__(self, router: Any, metrics: ServeMetrics, redis_url: str | None,
                 on_change: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.router = router
        self.metrics = metrics
        self.redis_url = redis_url
        self.workers: dict[str, WorkerState] = {}
        self.on_change = on_change
        self.redis_up = False
        self.dead_instances: set[str] = set()  # failed a request: never re-added from a stale heartbeat
        self.changed = asyncio.Event()

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

    def apply_events(self, worker_id: str, instance: str, data: bytes) -> None:
        state = self.workers.get(worker_id)
        if state is None or state.reg.instance != instance:
            return
        try:
            events = wire.decode_events(data)
        except KVCacheError as exc:
            log.error("dropped a malformed event batch from %s: %s", worker_id, exc)
            return
        for event in events:
            if isinstance(event, BlockStored):
                state.indexed_blocks.add(event.key)
            elif isinstance(event, BlockRemoved):
                state.indexed_blocks.discard(event.key)
        self.router.on_events(worker_id, events)
        self.metrics.indexed.labels(worker_id).set(len(state.indexed_blocks))

    async def _sync_registrations(self, client: Any) -> None:
        regs = await client.hgetall(wire.WORKERS_KEY)
        alive = {}
        for raw_id, raw in regs.items():
            worker_id = raw_id.decode()
            beat = await client.get(wire.alive_key(worker_id))
            alive[worker_id] = beat.decode() if beat is not None else None
            try:
                reg = Registration.from_json(raw)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("bad registration for %s: %s", worker_id, exc)
                continue
            if alive[worker_id] == reg.instance:
                self.add(reg)
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
                        self.apply_events(fields[b"worker"].decode(), fields[b"instance"].decode(),
                                          fields[b"events"])  # fmt: skip
            except asyncio.CancelledError:
                await client.aclose()
                raise
            except Exception as exc:  # Redis down: keep the workers we know and retry
                if self.redis_up:
                    log.warning("redis unavailable (%s); routing on the last known view", type(exc).__name__)
                self.redis_up = False
                await asyncio.sleep(POLL_S)
