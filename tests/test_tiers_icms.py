"""The pod-shared tier (ICMS emulation): sharing across workers, write-behind, prestaging, the link
model, damage and a Redis server killed mid-run, all ending in counted misses, never failures."""

from __future__ import annotations

import logging

import pytest
import torch
from tiers_helpers import LAYOUT, block, key, same_bits

from kvcache.cache import hashing
from kvcache.redis_server import start_redis
from kvcache.tiers import IcmsLink, IcmsTier, InProcessBackend, RedisBackend
from kvcache.tiers.icms import _name


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_link_defaults_follow_the_public_figures() -> None:
    t = IcmsLink().transfer
    assert t.bandwidth_bytes_per_s == 25e9  # 800 Gb/s shared by 4 GPUs
    assert (t.base_latency_ms, t.per_block_ms) == (0.3, 0.005)
    # 10 blocks of 1 MiB: 0.3 + 10 * 0.005 + 10 MiB / 25 GB/s
    assert t.transfer_ms(10, 10 * 2**20) == pytest.approx(0.3 + 0.05 + 10 * 2**20 / 25e9 * 1e3)
    assert t.transfer_ms(0, 0) == 0.0


def test_shared_across_workers_with_write_behind_and_cross_worker_hits() -> None:
    backend = InProcessBackend(capacity_blocks=3)
    w0, w1 = IcmsTier(backend, 0, write_behind_blocks=2), IcmsTier(backend, 1)
    w0.store(key(0), block(0))
    assert w0.contains(key(0)) and not w1.contains(key(0))  # buffered: only the writer sees it
    assert same_bits(w0.load(key(0)), block(0))
    w0.store(key(1), block(1))  # second buffered block: the batch is written
    assert not w0.pending and w1.lookup_prefix([key(0), key(1), key(2)]) == 2
    got = w1.load_many([key(0), key(1), key(2)])
    assert same_bits(got[0], block(0)) and same_bits(got[1], block(1)) and got[2] is None
    s = w1.stats
    assert (s.hits, s.misses, s.cross_worker_hits, s.sync_loads, s.prestaged_loads) == (2, 1, 2, 2, 0)
    assert s.stall_ms == pytest.approx(IcmsLink().transfer.transfer_ms(2, 2 * LAYOUT.block_nbytes))
    for i in (2, 3):
        w1.store(key(i), block(i))
    w1.flush()
    assert backend.count() == 3 and backend.evictions == 1 and not w1.contains(key(0))
    assert w1.stats.evictions == 1 and len(w1) == 3


def test_prestaged_loads_wait_for_nothing_and_sync_loads_wait_the_modelled_time() -> None:
    clock = FakeClock()
    backend = InProcessBackend(8)
    writer = IcmsTier(backend, 0, write_behind_blocks=1)
    writer.store(key(0), block(0))
    writer.store(key(1), block(1))
    reader = IcmsTier(backend, 1, emulate_latency=True, sleep=clock.sleep, clock=clock)
    assert reader.prestage([key(0), key(5)]) == 1
    assert same_bits(reader.load(key(0)), block(0)) and clock.slept == []
    assert same_bits(reader.load(key(1)), block(1))
    assert clock.slept == [pytest.approx(IcmsLink().transfer.transfer_ms(1, LAYOUT.block_nbytes) / 1e3)]
    s = reader.stats
    assert (s.prestaged_loads, s.sync_loads) == (1, 1)


def test_damaged_value_is_a_counted_miss_and_dropped(caplog: pytest.LogCaptureFixture) -> None:
    backend = InProcessBackend(8)
    tier = IcmsTier(backend, 0, write_behind_blocks=1)
    tier.store(key(0), block(0))
    name = _name(key(0))
    value = bytearray(backend.get_many([name])[0] or b"")
    value[-3] ^= 0x10
    backend.put_many([(name, bytes(value))])
    with caplog.at_level(logging.WARNING, logger="kvcache.tiers.icms"):
        assert tier.load(key(0)) is None
    assert "dropped corrupt block" in caplog.text
    assert (tier.stats.corrupt, tier.stats.misses) == (1, 1) and backend.count() == 0


def test_redis_backend_shares_blocks_and_survives_being_killed(caplog: pytest.LogCaptureFixture) -> None:
    with start_redis(maxmemory="64mb") as server:
        clock = FakeClock()
        w0 = IcmsTier(RedisBackend(server.url, 1000), 0, write_behind_blocks=2, clock=clock)
        w1 = IcmsTier(RedisBackend(server.url, 1000), 1, clock=clock)
        w0.store_many([key(0), key(1)], [block(0), block(1)])
        assert w1.lookup_prefix([key(0), key(1), key(2)]) == 2
        out = torch.empty(LAYOUT.block_shape, dtype=torch.bfloat16)
        assert w1.load(key(1), out) is out and same_bits(out, block(1))
        assert w1.stats.cross_worker_hits == 1 and len(w1) == 2
        w1.prestage([key(0)])
        server.process.kill()  # mid-run: the server is gone
        server.process.wait()
        with caplog.at_level(logging.WARNING, logger="kvcache.tiers.icms"):
            assert same_bits(w1.load(key(0)), block(0))  # prestaged before the kill
            assert w1.load(key(1)) is None
            assert w1.lookup_prefix([key(1)]) == 0
            w1.store(key(2), block(2))
            w1.flush()  # lost, not raised: the tier is not durable
            assert w0.load(key(0)) is None
        assert "ICMS backend unavailable" in caplog.text
        assert (w1.stats.errors, w1.stats.misses, w0.stats.errors, w0.stats.misses) == (3, 1, 1, 1)
        clock.now += 5.0  # after the back-off it tries again, and fails again quietly
        assert w1.load(key(1)) is None and w1.stats.errors == 4


def test_checksum_helper_is_xxh3_64_over_any_buffer() -> None:
    data = bytes(range(256)) * 3
    assert hashing.checksum(data) == hashing.checksum(memoryview(data)) == hashing.checksum(bytearray(data))
    assert hashing.checksum(data) != hashing.checksum(data[:-1])
    assert hashing.checksum(b"") == 0x2D06800538D394C2
