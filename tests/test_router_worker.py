"""The simulated worker: admission, prefix reuse, capacity waits, long prompts, spill, failure."""

from __future__ import annotations

import dataclasses

import pytest

from kvcache import BlockRemoved, BlockStored
from kvcache.costs import LatencyModel
from kvcache.lab.replay import prepare
from kvcache.lab.sim_worker import Job, SimWorker
from kvcache.lab.trace import FORMAT_MOONCAKE, Trace, TraceRequest

LAT = LatencyModel(
    prefill_base_ms=0.0,
    prefill_ms_per_token=1.0,
    prefill_ms_per_token_per_ctx_token=0.0,
    decode_base_ms=1.0,
    decode_ms_per_token_per_seq=0.0,
    max_num_seqs=4,
    max_batched_tokens=1000,
)


def jobs(*ids: tuple[int, ...], num_tokens: list[int] | None = None) -> list[Job]:
    reqs = [
        TraceRequest(0.0, (num_tokens or [4 * len(b) for b in ids])[i], 3, block_ids=b)
        for i, b in enumerate(ids)
    ]
    trace = Trace(reqs, FORMAT_MOONCAKE, 4)
    return [Job(i, f"r{i}", r, p, 0.0) for i, (r, p) in enumerate(zip(reqs, prepare(trace, 4), strict=True))]


def test_prefix_reuse_and_timing() -> None:
    w = SimWorker(0, num_blocks=8, block_size=4, latency=LAT)
    a, b = jobs((1, 2, 3), (1, 2, 4))
    w.submit(a)
    w.submit(b)
    started = w.try_start(0.0)
    assert started is not None and started.job is a and started.prefill_done_ms == 12.0
    assert [type(e) for e in started.events] == [BlockStored] * 3
    assert w.try_start(0.0) is None  # one prefill at a time
    assert w.prefill_done(a, 12.0) == 12.0 + 2 * 1.0  # 3 output tokens: first with prefill, 2 steps
    second = w.try_start(12.0)
    assert second is not None and second.job is b
    assert (b.cached_tokens, b.prefill_tokens, b.hit_blocks, b.query_blocks) == (8, 4, 2, 3)
    assert second.prefill_done_ms == 12.0 + 4.0
    w.finish(a, 14.0)
    assert a.finish_ms == 14.0 and list(w.running) == ["r1"]


def test_request_overhead_adds_to_first_token_and_finish_but_not_to_the_steps() -> None:
    w = SimWorker(0, num_blocks=8, block_size=4, latency=dataclasses.replace(LAT, request_overhead_ms=5.0))
    a, b = jobs((1, 2, 3), (1, 2, 4))
    w.submit(a)
    w.submit(b)
    started = w.try_start(0.0)
    assert started is not None and started.prefill_done_ms == 12.0  # the engine's time is unchanged
    assert w.prefill_done(a, 12.0) == 14.0  # and so is the decode
    assert a.first_token_ms == 17.0
    second = w.try_start(12.0)  # the next prefill starts when the engine is free, not 5 ms later
    assert second is not None and second.job is b
    w.finish(a, 14.0)
    assert a.finish_ms == 19.0


def test_waits_for_blocks_then_evicts() -> None:
    w = SimWorker(0, num_blocks=4, block_size=4, latency=LAT)
    a, b = jobs((1, 2, 3), (5, 6))
    w.submit(a)
    w.submit(b)
    assert w.try_start(0.0) is not None
    w.prefill_done(a, 12.0)
    assert w.try_start(12.0) is None  # 3 of 4 blocks held by a: b waits
    assert w.finish(a, 14.0) == []
    started = w.try_start(14.0)
    assert started is not None
    assert [type(e) for e in started.events] == [BlockRemoved, BlockStored, BlockStored]


def test_prompt_longer_than_pool_caches_its_head() -> None:
    w = SimWorker(0, num_blocks=2, block_size=4, latency=LAT)
    (a,) = jobs((1, 2, 3, 4))
    w.submit(a)
    started = w.try_start(0.0)
    assert started is not None and started.prefill_done_ms == 16.0
    assert [e.block_id for e in started.events if isinstance(e, BlockStored)] == [0, 1]


class FakeTier:
    def __init__(self) -> None:
        self.evicted: list[bytes] = []
        self.asked: list[int] = []
        self.prestaged: list[tuple[int, int, float]] = []  # (worker, keys, now_ms)

    def on_evict(self, worker_id: int, keys: list[bytes], now_ms: float) -> None:
        self.evicted += keys

    def fetch(self, worker_id: int, keys: list[bytes], now_ms: float) -> tuple[int, float]:
        self.asked.append(len(keys))
        held = 0
        while held < len(keys) and keys[held] in self.evicted:
            held += 1
        return held, 0.5 * held

    def prestage(self, worker_id: int, keys: list[bytes], now_ms: float) -> None:
        self.prestaged.append((worker_id, len(keys), now_ms))


def test_spill_hook_offloads_and_loads() -> None:
    tier = FakeTier()
    w = SimWorker(0, num_blocks=3, block_size=4, latency=LAT, spill=tier)
    a, b, c = jobs((1, 2), (7, 8, 9), (1, 2, 5))
    for job, t in ((a, 0.0), (b, 10.0)):
        w.submit(job)
        assert w.try_start(t) is not None
        w.prefill_done(job, t)
        w.finish(job, t)
    assert tier.evicted == [a.prompt.keys[1], a.prompt.keys[0]]  # tail first
    w.submit(c, 20.0)
    # c's blocks 1, 2 are no longer on the device: all 3 of its blocks are offered for prestaging.
    assert tier.prestaged[-1] == (0, 3, 20.0)
    started = w.try_start(20.0)
    assert started is not None
    assert (c.cached_tokens, c.loaded_tokens, c.prefill_tokens) == (0, 8, 4)
    assert started.prefill_done_ms == 20.0 + 1.0 + 4.0  # transfer of 2 blocks + 4 tokens


def test_fail_returns_every_job() -> None:
    w = SimWorker(0, num_blocks=8, block_size=4, latency=LAT)
    a, b = jobs((1,), (2,))
    w.submit(a)
    w.submit(b)
    assert w.try_start(0.0) is not None
    assert w.fail() == [a, b]
    assert not w.alive and w.manager.num_running == 0
    w.manager.check_invariants()


def test_latency_limits_slots() -> None:
    lat = LatencyModel(max_num_seqs=1)
    w = SimWorker(0, num_blocks=8, block_size=4, latency=lat)
    a, b = jobs((1,), (2,))
    w.submit(a)
    w.submit(b)
    assert w.try_start(0.0) is not None
    w.prefill_done(a, 1.0)
    assert w.try_start(1.0) is None  # the only sequence slot is decoding a
    assert pytest.approx(a.first_token_ms) == 1.0
