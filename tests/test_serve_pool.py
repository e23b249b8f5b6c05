"""The front's worker pool against a scripted Redis: liveness from heartbeats, refusals said once."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest
from deployment import KEYS, registration

from kvcache.router import Router
from kvcache.serve import wire
from kvcache.serve.metrics import ServeMetrics
from kvcache.serve.pool import WorkerPool
from kvcache.serve.wire import Registration
from kvcache.serve.worker import Worker


class ScriptedRedis:
    """``hgetall``/``get``/``pttl``/``set`` over dicts; ``beat`` writes a worker's next signed
    heartbeat and renews its key's TTL."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[bytes, bytes]] = {wire.WORKERS_KEY: {}}
        self.values: dict[str, bytes] = {}
        self.beats: dict[str, int] = {}  # instance -> its next beat number
        self.ttl_ms: dict[str, int] = {}

    def register(self, reg: Registration, signed_at: float | None = None) -> None:
        signed = KEYS.sign_registration(reg.to_json(), time.time() if signed_at is None else signed_at)
        self.hashes[wire.WORKERS_KEY][reg.worker_id.encode()] = signed.encode()
        self.beat(reg)

    def beat(self, reg: Registration) -> None:
        number = self.beats.get(reg.instance, 0)
        self.beats[reg.instance] = number + 1
        signed = KEYS.sign_heartbeat(reg.worker_id, reg.instance, number, time.time())
        self.values[wire.alive_key(reg.worker_id)] = signed.encode()
        self.ttl_ms[wire.alive_key(reg.worker_id)] = wire.ALIVE_TTL_S * 1000

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        return dict(self.hashes.get(key, {}))

    async def get(self, key: str) -> bytes | None:
        return self.values.get(key)

    async def pttl(self, key: str) -> int:
        return self.ttl_ms.get(key, -2)

    async def set(self, key: str, value: str, ex: int | None = None) -> None:
        self.values[key] = value.encode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reg(worker_id: str, instance: str, model_id: str = "tiny-llama") -> Registration:
    return registration(worker_id, f"http://127.0.0.1:1/{worker_id}", instance, model_id=model_id)


def test_a_worker_marked_down_comes_back_on_its_next_heartbeat() -> None:
    async def main() -> None:
        redis = ScriptedRedis()
        pool = WorkerPool(Router("round_robin", block_size=16), ServeMetrics(), None, keys=KEYS)
        w0 = reg("w0", "a")
        redis.register(w0)
        await pool._sync_registrations(redis)
        assert list(pool.workers) == ["w0"]
        pool.mark_down("w0", "a", failed=True)  # a connection to it failed
        await pool._sync_registrations(redis)
        assert pool.workers == {}  # its last heartbeat predates the failure: stays out
        redis.beat(w0)  # a beat the front had not read when it failed: written 3 s ago
        redis.ttl_ms[wire.alive_key("w0")] = 1000
        await pool._sync_registrations(redis)
        assert pool.workers == {}
        redis.beat(w0)  # it is alive after all
        await pool._sync_registrations(redis)
        assert list(pool.workers) == ["w0"] and pool.dead_instances == {}
        assert pool.router.workers == ["w0"]

    asyncio.run(main())


def test_heartbeats_count_only_when_signed_and_advancing() -> None:
    """Someone who can write Redis re-sets a worker's heartbeat key: with its last genuine value
    (a replay), with the bare instance id (the unsigned form) or with another worker's beat."""

    async def main() -> None:
        redis, clock = ScriptedRedis(), Clock()
        pool = WorkerPool(Router("round_robin", block_size=16), ServeMetrics(), None, keys=KEYS, clock=clock)
        w0, w1 = reg("w0", "a"), reg("w1", "b")
        redis.register(w0)
        redis.register(w1)
        await pool._sync_registrations(redis)
        assert sorted(pool.workers) == ["w0", "w1"]
        replayed = redis.values[wire.alive_key("w0")]  # w0 dies; its last heartbeat is re-set every poll
        for _ in range(4):
            clock.now += 1.0
            redis.beat(w1)
            redis.values[wire.alive_key("w0")] = replayed
            await pool._sync_registrations(redis)
            assert sorted(pool.workers) == ["w0", "w1"]  # within wire.ALIVE_TTL_S of its last new beat
        for _ in range(3):  # however long the replay goes on
            clock.now += 0.5
            redis.beat(w1)
            redis.values[wire.alive_key("w0")] = replayed
            await pool._sync_registrations(redis)
            assert list(pool.workers) == ["w1"] and pool.router.workers == ["w1"]
        redis.values[wire.alive_key("w0")] = b"a"  # the unsigned form: the bare instance id
        await pool._sync_registrations(redis)
        assert list(pool.workers) == ["w1"]
        redis.values[wire.alive_key("w0")] = redis.values[wire.alive_key("w1")]  # w1's beat under w0's name
        await pool._sync_registrations(redis)
        assert list(pool.workers) == ["w1"]
        redis.beat(w0)  # a genuine new beat brings it back
        await pool._sync_registrations(redis)
        assert sorted(pool.workers) == ["w0", "w1"]

    asyncio.run(main())


def test_a_registration_signed_too_long_ago_leaves_the_pool_despite_heartbeats() -> None:
    async def main() -> None:
        redis = ScriptedRedis()
        pool = WorkerPool(Router("round_robin", block_size=16), ServeMetrics(), None, keys=KEYS)
        w0 = reg("w0", "a")
        redis.register(w0)
        await pool._sync_registrations(redis)
        assert list(pool.workers) == ["w0"]
        stale = KEYS.sign_registration(w0.to_json(), time.time() - 36)  # its worker stopped re-signing
        redis.hashes[wire.WORKERS_KEY][b"w0"] = stale.encode()
        redis.beat(w0)
        await pool._sync_registrations(redis)
        assert pool.workers == {} and pool.router.workers == []

    asyncio.run(main())


def test_a_worker_with_another_model_is_refused_once_on_both_sides(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        redis = ScriptedRedis()
        pool = WorkerPool(Router("round_robin", block_size=16), ServeMetrics(), None, keys=KEYS)
        redis.register(reg("w0", "a"))
        redis.register(reg("w1", "b", model_id="other-model"))
        with caplog.at_level(logging.ERROR, logger="kvcache.front"):
            for _ in range(12):  # three seconds of polling
                await pool._sync_registrations(redis)
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1 and "w1 serves other-model" in refusals[0].getMessage()
        assert list(pool.workers) == ["w0"]
        opened = KEYS.open_notice(redis.values[wire.refused_key("w1")])
        assert opened is not None  # signed by the front
        notice = json.loads(opened)
        assert notice["instance"] == "b" and "other-model" in notice["reason"]

        engine: Any = None
        worker = Worker(engine, "w1", None, KEYS)
        worker.instance = "b"
        with caplog.at_level(logging.ERROR, logger="kvcache.worker"):
            assert await worker._was_refused(redis)
        assert worker.stop.is_set() and worker.refused is not None and "other-model" in worker.refused
        other = Worker(engine, "w1", None, KEYS)  # a later instance under the same id is not refused
        assert not await other._was_refused(redis)
        # Whoever can write Redis cannot stop a worker: an unsigned notice naming it is ignored.
        await redis.set(wire.refused_key("w0"), json.dumps({"instance": "a", "reason": "forged"}))
        healthy = Worker(engine, "w0", None, KEYS)
        healthy.instance = "a"
        assert not await healthy._was_refused(redis) and not healthy.stop.is_set()

    asyncio.run(main())
