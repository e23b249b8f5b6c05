"""The front's view of its workers: who is up, where, and what each caches (from Redis).

Two background loops keep the router current:

- registrations: every ``POLL_S`` the pool reads ``kvcache:workers`` and the heartbeat keys; a
  new worker (or a new *instance* of a known id, i.e. a restart) is added to the router, purging
  whatever the router believed about the earlier instance; a worker whose heartbeat expired is
  removed. A worker whose connection fails is removed at once by the front (``mark_down``) and
  re-added only once it heartbeats *after* that (the heartbeat key's TTL was renewed), so a
  crashed worker's last heartbeat cannot bring it back while a live one returns within a beat.
  Liveness is heartbeats only: a slow answer never removes a worker.
- a worker that serves another model or block size than the first one is refused once: one
  error line here, and a ``kvcache:refused:<id>`` key naming its instance and the reason, on
  which the worker logs the reason and stops.
- events: the pool follows the ``kvcache:events`` stream from the point it started and hands
  each batch to ``router.on_events``. Batches from an instance that is not the current one are
  dropped, so a dead worker's late events cannot resurrect blocks it no longer has.

When Redis is unreachable both loops wait and retry; the pool keeps the workers it knows, so
serving continues with the router's last view.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
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
        # Instances whose connection failed -> when (monotonic s): back only on a later heartbeat.
        self.dead_instances: dict[str, float] = {}
        self.refused: dict[str, str] = {}  # instance -> why it was refused (logged once)
        self.changed = asyncio.Event()
        self.first: Registration | None = None  # a plain attribute: read from other threads too

    def add(self, reg: Registration) -> None:
        known = self.workers.get(reg.worker_id)
        if (known is not None and known.reg.instance == reg.instance) or reg.instance in self.dead_instances:
            return
        if reg.instance in self.refused:
            return
        first = self.first
        if first is not None and (first.model_id, first.block_size) != (reg.model_id, reg.block_size):
            reason = (f"worker {reg.worker_id} serves {reg.model_id} with block size {reg.block_size}; "
                      f"this deployment serves {first.model_id} with block size {first.block_size}: "
                      "refused")  # fmt: skip
            self.refused[reg.instance] = reason
            log.error("%s", reason)
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
            self.dead_instances[state.reg.instance] = time.monotonic()
        del self.workers[worker_id]
        self.router.remove_worker(worker_id)
        self.metrics.indexed.labels(worker_id).set(0)
        self._changed()
        log.warning("worker %s removed", worker_id)

    def _changed(self) -> None:
        self.first = next(iter(self.workers.values())).reg if self.workers else None
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
            if alive[worker_id] != reg.instance:
                continue
            marked = self.dead_instances.get(reg.instance)
            if marked is not None:
                # The key's TTL restarts at every heartbeat: the last one was ttl_left - TTL ago.
                ttl_ms = await client.pttl(wire.alive_key(worker_id))
                beat_at = time.monotonic() - (wire.ALIVE_TTL_S * 1000 - ttl_ms) / 1000
                if ttl_ms < 0 or beat_at <= marked:
                    continue
                del self.dead_instances[reg.instance]
                log.info("worker %s heartbeats again after a failed connection: back in the pool", worker_id)
            refused = reg.instance in self.refused
            self.add(reg)
            if not refused and reg.instance in self.refused:
                notice = json.dumps({"instance": reg.instance, "reason": self.refused[reg.instance]})
                await client.set(wire.refused_key(worker_id), notice, ex=wire.REFUSED_TTL_S)
        for worker_id, state in list(self.workers.items()):
            if alive.get(worker_id) != state.reg.instance:
                self.mark_down(worker_id, state.reg.instance)

    async def run(self) -> None:
        """Follow registrations and events until cancelled; without Redis the caller adds workers."""
        import redis.asyncio as aioredis

        if self.redis_url is None:
            return
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
