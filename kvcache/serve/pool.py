"""The front's view of its workers: who is up, where, and what each caches (from Redis).

Two background loops keep the router current:

- registrations: every ``POLL_S`` the pool reads ``kvcache:workers`` and the heartbeat keys; a
  new worker (or a new *instance* of a known id, i.e. a restart) is added to the router, purging
  whatever the router believed about the earlier instance; a worker whose heartbeat expired is
  removed. A worker whose connection fails is removed at once by the front (``mark_down``) and
  re-added only once it heartbeats *after* that (a higher beat number than the front had seen,
  written after the failure as the heartbeat key's TTL tells), so a crashed worker's last
  heartbeat, even one the front had not read yet, cannot bring it back while a live one returns
  within a beat or two.
  Liveness is heartbeats only: a slow answer never removes a worker.
- a worker that serves another model or block size than the first one is refused once: one
  error line here, and a ``kvcache:refused:<id>`` key naming its instance and the reason, on
  which the worker logs the reason and stops.
- events: the pool reads the ``kvcache:events`` stream from its first entry (after a first
  read of the registrations) and hands each batch to ``router.on_events``, so a front that
  joins a running deployment learns what the current workers hold from their earlier batches
  (as far as the trimmed stream goes back). Each front reads the whole stream by itself
  (``XREAD``, no consumer group that would split it): every front sees every batch. The load
  a batch carries (``wire.WorkerLoad``: running and waiting requests, KV usage) is kept per
  worker, exported as gauges and given to the router (``observe_load``). Batches from an
  instance that is not the current one are dropped, so a dead worker's late events cannot
  resurrect blocks it no longer has.

Redis is not trusted (see docs/serve.md, "Threat model"): a registration joins only with a valid
MAC from a worker of this deployment, signed within ``auth.REGISTRATION_MAX_AGE_S``, and only if
its hasher fingerprint equals the front's (so router keys are the worker's keys); it stays only
while its heartbeats verify (MAC over worker, instance, beat number and time, signed within the
same bound) and their beat number keeps going up (within ``wire.ALIVE_TTL_S`` by the front's
clock), and while its registration stays freshly signed: re-writing an old heartbeat or
registration into Redis keeps nobody alive; an event batch
(events and load) counts only with a valid MAC and a sequence number above the last one seen
from that instance.
A worker's indexed keys never exceed the pool capacity it registered (its ``num_blocks``, the
bound its router index slot is given): past it the least recently stored are dropped, whatever a
worker or a forger publishes.

When Redis is unreachable both loops wait and retry; the pool keeps the workers it knows, so
serving continues with the router's last view.

Not here: which worker holds which keys, and its bound: that is the router's one index
(``router.index.PreciseIndex``, owned by ``Router``); the pool only verifies batches and hands
them to ``router.on_events``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvcache.errors import AuthError, KVCacheError
from kvcache.router import Router
from kvcache.serve import wire
from kvcache.serve.auth import DeploymentKeys, key_check
from kvcache.serve.metrics import ServeMetrics
from kvcache.serve.wire import Registration, WorkerLoad

log = logging.getLogger("kvcache.front")
POLL_S = 0.25


@dataclass(slots=True)
class WorkerState:
    reg: Registration
    last_seq: int = -1
    load: WorkerLoad | None = None  # as its last event batch reported it


class WorkerPool:
    """Workers by id, kept in step with Redis; owns the router's ``add/remove_worker`` calls."""

    def __init__(
        self,
        router: Router,
        metrics: ServeMetrics,
        redis_url: str | None,
        on_change: Callable[[], None] | None = None,
        *,
        keys: DeploymentKeys,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self.keys = keys
        self.clock = clock  # when beat numbers rose; time.time() only for signatures' freshness
        self.metrics = metrics
        self.redis_url = redis_url
        self.workers: dict[str, WorkerState] = {}
        self.on_change = on_change
        self.redis_up = False
        # Instances whose connection failed -> (the beat number seen then, when: monotonic s).
        self.dead_instances: dict[str, tuple[int, float]] = {}
        self._beats: dict[str, tuple[int, float]] = {}  # instance -> (last beat number, when it rose)
        self.refused: dict[str, str] = {}  # instance -> why it was refused (logged once)
        self.changed = asyncio.Event()
        # worker id -> the registration and heartbeat last refused
        self._bad_registrations: dict[str, tuple[bytes, bytes]] = {}
        self.first: Registration | None = None  # a plain attribute: read from other threads too

    def add(self, reg: Registration) -> None:
        known = self.workers.get(reg.worker_id)
        if (known is not None and known.reg.instance == reg.instance) or reg.instance in self.dead_instances:
            return
        if reg.instance in self.refused:
            return
        reason = self._refusal(reg)
        if reason is not None:
            self.refused[reg.instance] = reason
            log.error("%s", reason)
            return
        if known is not None:
            self.router.remove_worker(reg.worker_id)  # a restart: forget the old instance's blocks
        self.router.add_worker(reg.worker_id, capacity_blocks=reg.num_blocks)
        self.workers[reg.worker_id] = WorkerState(reg)
        self.metrics.indexed.labels(reg.worker_id).set(0)
        self._changed()
        log.info("worker %s joined at %s (instance %s)", reg.worker_id, reg.url, reg.instance)

    def _refusal(self, reg: Registration) -> str | None:
        """Why ``reg`` cannot join this deployment, or None."""
        if isinstance(reg.num_blocks, bool) or not isinstance(reg.num_blocks, int) or reg.num_blocks < 1:
            return (
                f"worker {reg.worker_id} registered num_blocks={reg.num_blocks!r}, not a pool size "
                ">= 1 (its index bound): refused"
            )
        first = self.first
        if first is not None and (first.model_id, first.block_size) != (reg.model_id, reg.block_size):
            return (
                f"worker {reg.worker_id} serves {reg.model_id} with block size {reg.block_size}; "
                f"this deployment serves {first.model_id} with block size {first.block_size}: "
                "refused"
            )
        mine = key_check(
            self.keys.hasher(block_size=reg.block_size, model_id=reg.model_id, adapter_id=reg.adapter_id)
        )
        if reg.key_check != mine:
            return (
                f"worker {reg.worker_id} keys blocks differently from this front (another deployment "
                "secret, model or adapter): refused"
            )
        return None

    def mark_down(self, worker_id: str, instance: str | None = None, failed: bool = False) -> None:
        state = self.workers.get(worker_id)
        if state is None or (instance is not None and state.reg.instance != instance):
            return
        if failed:
            seen_beat = self._beats.get(state.reg.instance, (-1, 0.0))[0]
            self.dead_instances[state.reg.instance] = (seen_beat, time.monotonic())
        del self.workers[worker_id]
        self.router.remove_worker(worker_id)
        m = self.metrics
        for gauge in (m.indexed, m.running, m.waiting, m.kv_usage):
            gauge.labels(worker_id).set(0)
        self._changed()
        log.warning("worker %s removed", worker_id)

    def _changed(self) -> None:
        self.first = next(iter(self.workers.values())).reg if self.workers else None
        self.metrics.workers.set(len(self.workers))
        self.changed.set()
        self.changed = asyncio.Event()
        if self.on_change is not None:
            self.on_change()

    def apply_events(self, fields: dict[bytes, bytes]) -> None:
        """One stream entry ``{worker, instance, seq, events, load, mac}``: verified, bounded, applied."""
        try:
            worker_id, instance = fields[b"worker"].decode(), fields[b"instance"].decode()
            seq, data, mac = int(fields[b"seq"]), fields[b"events"], fields[b"mac"]
            raw_load = fields.get(b"load", b"")
        except (KeyError, ValueError) as exc:
            log.error("dropped a malformed event entry (%s)", type(exc).__name__)
            return
        state = self.workers.get(worker_id)
        if state is None or state.reg.instance != instance:
            return
        if not self.keys.check_events(worker_id, instance, seq, data, mac, raw_load):
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
        self.router.on_events(worker_id, events)  # bounded there, to the registered num_blocks
        self.metrics.indexed.labels(worker_id).set(self.num_indexed(worker_id))
        if raw_load:
            try:
                load = WorkerLoad.decode(raw_load)
            except ValueError as exc:
                log.error("dropped a malformed load report from %s: %s", worker_id, exc)
                return
            state.load = load
            self.router.observe_load(worker_id, load.num_running + load.num_waiting)
            m = self.metrics
            m.running.labels(worker_id).set(load.num_running)
            m.waiting.labels(worker_id).set(load.num_waiting)
            m.kv_usage.labels(worker_id).set(load.kv_usage)

    def num_indexed(self, worker_id: str) -> int:
        """Blocks the router's index holds for the worker (at most its registered ``num_blocks``)."""
        return self.router.index.num_keys(worker_id)

    async def _sync_registrations(self, client: Any) -> None:
        regs = await client.hgetall(wire.WORKERS_KEY)
        bad, now_bad = self._bad_registrations, {}
        alive: dict[str, str] = {}  # worker id -> instance, for workers whose signed beats advance
        seen: set[str] = set()  # instances with a verified heartbeat now, advancing or not
        now = time.time()
        for raw_id, raw in regs.items():
            worker_id = raw_id.decode()
            raw_beat = await client.get(wire.alive_key(worker_id))
            if raw_beat is None:
                continue  # no heartbeat (the key expired): not alive
            try:
                reg = Registration.from_json(self.keys.open_registration(raw, now))
                if reg.worker_id != worker_id:
                    raise AuthError(f"registration of {reg.worker_id!r} stored under {worker_id!r}")
                instance, beat = self.keys.open_heartbeat(worker_id, raw_beat, now)
            except (ValueError, KeyError, TypeError, AuthError) as exc:
                if bad.get(worker_id) != (raw, raw_beat):  # each refused value is logged once, not every poll
                    log.error("registration or heartbeat of %r refused: %s", worker_id, exc)
                now_bad[worker_id] = (raw, raw_beat)
                continue
            if instance != reg.instance:
                continue
            seen.add(instance)
            if not self._beating(instance, beat):
                continue
            alive[worker_id] = instance
            marked = self.dead_instances.get(instance)
            if marked is not None:
                # Back on a beat it wrote after the failure: a higher number (a replay has none) and a
                # key set since (its TTL restarts at every beat), so not one in flight as it died.
                ttl_ms = await client.pttl(wire.alive_key(worker_id))
                written_at = time.monotonic() - (wire.ALIVE_TTL_S * 1000 - ttl_ms) / 1000
                if beat <= marked[0] or ttl_ms < 0 or written_at <= marked[1]:
                    continue
                del self.dead_instances[instance]
                log.info("worker %s heartbeats again after a failed connection: back in the pool", worker_id)
            refused = reg.instance in self.refused
            self.add(reg)
            if not refused and reg.instance in self.refused:
                notice = json.dumps({"instance": reg.instance, "reason": self.refused[reg.instance]})
                signed = self.keys.sign_notice(notice)
                await client.set(wire.refused_key(worker_id), signed, ex=wire.REFUSED_TTL_S)
        self._bad_registrations = now_bad
        for worker_id, state in list(self.workers.items()):
            if alive.get(worker_id) != state.reg.instance:
                self.mark_down(worker_id, state.reg.instance)
        # A replayed beat stays known (and frozen) until its signature is too old to verify.
        self._beats = {i: b for i, b in self._beats.items() if i in seen or i in self.dead_instances}

    def _beating(self, instance: str, beat: int) -> bool:
        """Whether ``instance``'s beat number went up within ``wire.ALIVE_TTL_S`` (by this front's
        clock): a replayed or frozen heartbeat stops counting however often it is written again."""
        now = self.clock()
        last = self._beats.get(instance)
        if last is None or beat > last[0]:
            self._beats[instance] = (beat, now)
            return True
        return now - last[1] <= wire.ALIVE_TTL_S

    async def run(self) -> None:
        """Follow registrations and events until cancelled; without Redis the caller adds workers."""
        import redis.asyncio as aioredis

        if self.redis_url is None:
            return
        client: Any = aioredis.Redis.from_url(self.redis_url, socket_timeout=2.0, socket_connect_timeout=1.0)
        last_id = "0-0"  # the first entry on: batches of instances that are gone are skipped
        next_poll = 0.0  # registrations first, so the current workers' earlier batches apply
        loop = asyncio.get_running_loop()
        while True:
            try:
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
