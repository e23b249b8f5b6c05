"""Simulated tiers for the replay: the SpillHook protocol with exact hits, cascade and times."""

from __future__ import annotations

import pytest

from kvcache.costs import LatencyModel
from kvcache.errors import ConfigError
from kvcache.lab.sim_tiers import G2_TRANSFER, G3_TRANSFER, ICMS_TRANSFER, SimTiers, TierSizes

KV = SimTiers(1, TierSizes(g2=1), 16).kv_bytes_per_token


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_parse_sizes() -> None:
    assert TierSizes.parse("g2=4x,g3=100,icms=2.5x", device_blocks=10) == TierSizes(40, 100, 25)
    assert TierSizes.parse("icms=7", 10) == TierSizes(0, 0, 7)
    for bad in ("g4=1", "g2", "g2=abc", "g2=1,g2=2", "", "g2=-1"):
        with pytest.raises(ConfigError):
            TierSizes.parse(bad, 10)


def test_eviction_cascades_and_fetch_prices_each_tier_once() -> None:
    sim = SimTiers(
        num_workers=2, sizes=TierSizes(g2=2, g3=2, icms=100), block_tokens=512, kv_bytes_per_token=1024
    )
    sim.on_evict(0, [k(0), k(1), k(2), k(3), k(4)], 0.0)
    # worker 0: G2 holds 3, 4; G3 holds 1, 2 (0 fell off the end); ICMS holds all five
    assert sim.occupancy() == {"g2": 2, "g3": 2, "icms": 5}
    nbytes = 512 * 1024
    n, ms = sim.fetch(0, [k(3), k(4), k(1), k(0), k(9)], 1.0)
    assert n == 4
    assert ms == pytest.approx(
        G2_TRANSFER.transfer_ms(2, 2 * nbytes)
        + G3_TRANSFER.transfer_ms(1, nbytes)
        + ICMS_TRANSFER.transfer_ms(1, nbytes)
    )
    assert (sim.stats["g2"].blocks_hit, sim.stats["g3"].blocks_hit, sim.stats["icms"].blocks_hit) == (2, 1, 1)
    assert sim.stats["icms"].cross_worker_hits == 0
    # another worker finds worker 0's blocks only in the shared tier
    n, ms = sim.fetch(1, [k(2), k(3), k(7)], 2.0)
    assert (n, ms) == (2, pytest.approx(ICMS_TRANSFER.transfer_ms(2, 2 * nbytes)))
    assert sim.stats["icms"].cross_worker_hits == 2
    assert sim.fetch(1, [k(9)], 3.0) == (0, 0.0)


def test_shared_tier_capacity_is_lru() -> None:
    sim = SimTiers(num_workers=1, sizes=TierSizes(icms=2), block_tokens=16)
    sim.on_evict(0, [k(0), k(1)], 0.0)
    assert sim.fetch(0, [k(0)], 0.0)[0] == 1  # refreshes 0
    sim.on_evict(0, [k(2)], 0.0)
    assert sim.fetch(0, [k(1)], 0.0)[0] == 0 and sim.fetch(0, [k(0), k(2)], 0.0)[0] == 2
    assert sim.stats["icms"].evictions == 1


def test_cost_rule_declines_slow_loads() -> None:
    # recompute nearly free: never load
    cheap = LatencyModel(prefill_ms_per_token=1e-6, prefill_ms_per_token_per_ctx_token=0.0)
    sim = SimTiers(num_workers=1, sizes=TierSizes(g2=4), block_tokens=16, prefill=cheap)
    sim.on_evict(0, [k(0), k(1)], 0.0)
    assert sim.fetch(0, [k(0), k(1)], 0.0) == (0, 0.0)
    assert sim.blocks_declined == 2


def test_prestaging_copies_shared_blocks_into_host_memory_ahead_of_need() -> None:
    nbytes = 512 * 1024
    sizes = TierSizes(g2=100, icms=100)
    sim = SimTiers(num_workers=2, sizes=sizes, block_tokens=512, kv_bytes_per_token=1024)
    sim.on_evict(0, [k(0), k(1), k(2)], 0.0)
    staging_ms = ICMS_TRANSFER.transfer_ms(2, 2 * nbytes)
    host_ms = G2_TRANSFER.transfer_ms(2, 2 * nbytes)
    assert staging_ms > host_ms

    sim.prestage(1, [k(0), k(1), k(9)], 10.0)  # routed at 10 ms: k(0), k(1) start moving
    assert sim.occupancy()["g2"] == 3 + 2  # worker 0's evictions, and worker 1's two copies
    # Started after the staging finished: a host-memory load.
    assert sim.fetch(1, [k(0), k(1)], 10.0 + staging_ms + 5.0) == (2, pytest.approx(host_ms))
    assert sim.stats["icms"].prestaged == 2 and sim.stats["icms"].blocks_hit == 2
    assert sim.stats["icms"].cross_worker_hits == 2 and sim.stats["g2"].blocks_hit == 0

    sim.prestage(1, [k(2)], 100.0)
    one = ICMS_TRANSFER.transfer_ms(1, nbytes)
    # Started before it finished: the rest of the staging, then the host-memory load.
    n, ms = sim.fetch(1, [k(2)], 100.0 + one / 4)
    assert (n, ms) == (1, pytest.approx(one * 3 / 4 + G2_TRANSFER.transfer_ms(1, nbytes)))
    # The copy stays in host memory: a later fetch is a plain G2 hit.
    assert sim.fetch(1, [k(2)], 200.0) == (1, pytest.approx(G2_TRANSFER.transfer_ms(1, nbytes)))
    assert sim.stats["g2"].blocks_hit == 1 and sim.stats["icms"].prestaged == 3


def test_nothing_is_prestaged_without_a_first_tier_above_the_others() -> None:
    # As the engine's prefetch: it copies lower tiers' blocks up into host memory, and needs one.
    sim = SimTiers(num_workers=2, sizes=TierSizes(icms=100), block_tokens=16)
    sim.on_evict(0, [k(0)], 0.0)
    sim.prestage(1, [k(0)], 0.0)
    assert sim.fetch(1, [k(0)], 1e6) == (1, pytest.approx(ICMS_TRANSFER.transfer_ms(1, 16 * KV)))
    assert sim.stats["icms"].prestaged == 0


def test_a_block_loaded_from_a_slower_tier_is_promoted_into_the_first() -> None:
    sim = SimTiers(num_workers=1, sizes=TierSizes(g2=1, g3=4), block_tokens=16)
    sim.on_evict(0, [k(0), k(1)], 0.0)  # G2 holds 1; 0 went down to G3
    assert sim.fetch(0, [k(0)], 0.0) == (1, pytest.approx(G3_TRANSFER.transfer_ms(1, 16 * KV)))
    # k(0) is in G2 now, and k(1) was demoted to make room for it
    assert sim.fetch(0, [k(0)], 1.0) == (1, pytest.approx(G2_TRANSFER.transfer_ms(1, 16 * KV)))
    assert sim.fetch(0, [k(1)], 2.0) == (1, pytest.approx(G3_TRANSFER.transfer_ms(1, 16 * KV)))
    assert (sim.stats["g2"].blocks_in, sim.stats["g3"].blocks_in) == (4, 2)


def test_the_cost_rule_prices_recomputation_after_the_device_hit() -> None:
    # Recomputing one block of 16 tokens costs more the more context sits in front of it.
    lat = LatencyModel(prefill_ms_per_token=0.0, prefill_ms_per_token_per_ctx_token=1e-4)
    load_ms = G3_TRANSFER.transfer_ms(1, 16 * KV)
    assert lat.compute_ms(16, 0) < load_ms < lat.compute_ms(16, 10_000)
    sim = SimTiers(num_workers=1, sizes=TierSizes(g3=4), block_tokens=16, prefill=lat)
    sim.on_evict(0, [k(0)], 0.0)
    assert sim.fetch(0, [k(0)], 0.0, context_tokens=0) == (0, 0.0)
    assert sim.fetch(0, [k(0)], 0.0, context_tokens=10_000) == (1, pytest.approx(load_ms))
    assert sim.blocks_declined == 1


def test_prestaging_off_changes_nothing() -> None:
    sim = SimTiers(num_workers=2, sizes=TierSizes(icms=100), block_tokens=16, prestaging=False)
    sim.on_evict(0, [k(0)], 0.0)
    sim.prestage(1, [k(0)], 0.0)
    assert sim.fetch(1, [k(0)], 1e6) == (
        1,
        pytest.approx(ICMS_TRANSFER.transfer_ms(1, 16 * sim.kv_bytes_per_token)),
    )
    assert sim.stats["icms"].prestaged == 0
