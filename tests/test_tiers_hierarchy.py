"""The hierarchy: offload on eviction through a real BlockManager, promote on hit, demotion
cascade, cost rule, and a property: no interleaving of store/load/evict loses a block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from kvcache.kernels import pack_blocks, unpack_blocks
from tiers_helpers import LAYOUT, block, key, same_bits

from kvcache import BlockManager, CacheConfig, CapacityError
from kvcache.errors import TierError
from kvcache.tiers import (
    DiskTier,
    Hierarchy,
    HostTier,
    IcmsTier,
    InProcessBackend,
    PrefillCost,
    TierPolicy,
    TransferModel,
)


def keys(*ids: int) -> list[bytes]:
    return [key(i).key for i in ids]


def kv_of(k: bytes) -> torch.Tensor:
    """The KV a model would compute for block key ``k`` (deterministic stand-in)."""
    return block(int.from_bytes(k[:6], "little"))


def test_store_demotes_down_the_chain_and_load_promotes(tmp_path: Path) -> None:
    g2, g3 = HostTier(LAYOUT, 2), DiskTier(tmp_path, 8)
    icms = IcmsTier(InProcessBackend(8), write_behind_blocks=1)
    h = Hierarchy(LAYOUT, [g2, g3, icms])
    h.store(keys(0, 1, 2, 3), torch.stack([block(i) for i in range(4)]))
    # 0 and 1 went down to disk; every block was also written behind to the shared tier
    assert [len(g2), len(g3), len(icms)] == [2, 2, 4]
    assert h.lookup_prefix(keys(0, 1, 2, 3, 4)) == 4
    packed = h.load(keys(0, 1, 2))
    assert packed.shape == (3, *LAYOUT.block_shape)
    assert all(same_bits(packed[i], block(i)) for i in range(3))
    s = h.stats()
    assert (s.blocks_loaded, s.blocks_promoted, s.prefill_tokens_saved, s.loads) == (3, 2, 12, 1)
    assert (s.tiers["G2"].hits, s.tiers["G3"].hits, s.tiers["ICMS"].hits) == (1, 2, 0)
    assert g2.contains(key(0)) and g2.contains(key(1))  # promoted; 2 and 3 pushed to disk
    assert g3.contains(key(2)) and g3.contains(key(3))


def test_a_damaged_block_truncates_the_load(tmp_path: Path) -> None:
    g3 = DiskTier(tmp_path, 8)
    h = Hierarchy(LAYOUT, [g3], TierPolicy(promote_on_hit=False))
    h.store(keys(0, 1, 2), torch.stack([block(i) for i in range(3)]))
    path = g3.path(key(1))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    packed = h.load(keys(0, 1, 2))
    assert packed.shape[0] == 1 and same_bits(packed[0], block(0))
    assert g3.stats.corrupt == 1 and h.lookup_prefix(keys(0, 1, 2)) == 1


def test_cost_rule_declines_loads_slower_than_recompute() -> None:
    slow = TransferModel(bandwidth_bytes_per_s=1e3, base_latency_ms=1.0)  # 512 bytes = 512 ms
    h = Hierarchy(
        LAYOUT, [HostTier(LAYOUT, 4)], TierPolicy(prefill=PrefillCost(ms_per_token=1.0)), transfer=[slow]
    )
    h.store(keys(0, 1), torch.stack([block(0), block(1)]))
    assert h.load(keys(0, 1)).shape[0] == 0
    assert h.stats().blocks_declined == 2
    with pytest.raises(TierError, match="needs one TransferModel per tier"):
        Hierarchy(LAYOUT, [HostTier(LAYOUT, 4)], TierPolicy(prefill=PrefillCost(1.0)))


def test_prefetch_stages_shared_blocks_and_promotes_disk_blocks(tmp_path: Path) -> None:
    backend = InProcessBackend(16)
    other = IcmsTier(backend, worker_id=1, write_behind_blocks=1)
    other.store(key(0), block(0))
    g2, g3, icms = HostTier(LAYOUT, 4), DiskTier(tmp_path, 4), IcmsTier(backend, worker_id=0)
    g3.store(key(1), block(1))
    h = Hierarchy(LAYOUT, [g2, g3, icms])
    assert h.prefetch(keys(0, 1)) == 2
    assert g2.contains(key(1)) and icms.staged
    packed = h.load(keys(0, 1))
    assert same_bits(packed[0], block(0)) and same_bits(packed[1], block(1))
    s = icms.stats
    assert (s.prestaged_loads, s.sync_loads, s.cross_worker_hits, s.stall_ms) == (1, 0, 1, 0.0)


def test_engine_round_trip_through_block_manager_eviction() -> None:
    """A device pool of 2 blocks: blocks evicted by the manager come back bit-exact from G2."""
    manager = BlockManager(CacheConfig(num_blocks=2, block_size=4, model_id="tiny"))
    pool = torch.zeros(2, 2, 2, 4, 2, 8, dtype=torch.bfloat16)
    h = Hierarchy(LAYOUT, [HostTier(LAYOUT, 8)])
    manager.set_evict_hook(h.evict_hook(pool))
    prompt = list(range(9))
    ks = manager.hash(prompt).keys
    a = manager.allocate("a", prompt[:8])
    unpack_blocks(pool, torch.tensor(a.block_ids), torch.stack([kv_of(k) for k in ks[:2]]))
    manager.free("a")
    manager.allocate("b", list(range(100, 108)))  # evicts both: written back to G2
    manager.free("b")
    assert h.stats().blocks_offloaded == 2 and h.lookup_prefix(ks[:2]) == 2
    assert all(same_bits(h.load(ks[:2])[i], kv_of(ks[i])) for i in range(2))
    with pytest.raises(TierError, match="differs"):
        h.evict_hook(torch.zeros(2, 2, 2, 4, 2, 8, dtype=torch.float32))


class SpillMachine(RuleBasedStateMachine):
    """Random allocate/free on a 4-block device pool whose evictions spill to G2 (2 blocks) and
    G3 (large). Every block ever computed must stay retrievable bit-exact from the device or a
    tier, and every restored block must equal what was computed."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.tmp = tempfile.TemporaryDirectory()
        self.manager = BlockManager(CacheConfig(num_blocks=4, block_size=4, model_id="tiny"))
        self.pool = torch.zeros(2, 2, 4, 4, 2, 8, dtype=torch.bfloat16)
        self.h = Hierarchy(LAYOUT, [HostTier(LAYOUT, 2), DiskTier(self.tmp.name, 1000)])
        self.manager.set_evict_hook(self.h.evict_hook(self.pool))
        self.running: list[int] = []
        self.seen: set[bytes] = set()
        self.next_id = 0

    def teardown(self) -> None:
        self.tmp.cleanup()

    @rule(tokens=st.lists(st.integers(0, 2), min_size=4, max_size=13))
    def allocate(self, tokens: list[int]) -> None:
        m = self.manager
        ks = m.hash(tokens).keys
        try:
            a = m.allocate(self.next_id, tokens)
        except CapacityError:  # every device block is held by running requests
            return
        self.running.append(self.next_id)
        self.next_id += 1
        start = a.num_cached_tokens // 4
        n = self.h.lookup_prefix(ks[start:])
        packed = self.h.load(ks[start : start + n])
        for i, k in enumerate(ks[start : start + packed.shape[0]]):
            assert same_bits(packed[i], kv_of(k)), "a tier served wrong bytes"
        ids = a.block_ids[start : len(ks)]
        fresh = torch.stack([kv_of(k) for k in ks[start:]]) if ks[start:] else packed
        if ids:
            unpack_blocks(self.pool, torch.tensor(ids), fresh)
        # device hits hold what was computed
        if start:
            got = pack_blocks(self.pool, torch.tensor(a.block_ids[:start]))
            assert all(same_bits(got[i], kv_of(ks[i])) for i in range(start))
        self.seen.update(ks)

    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        if self.running:
            rid = data.draw(st.sampled_from(self.running))
            self.running.remove(rid)
            self.manager.free(rid)

    @invariant()
    def nothing_is_lost(self) -> None:
        index = self.manager.pool.index
        for k in self.seen:
            if k in index:
                got = self.pool[:, :, index[k]]
            else:
                assert self.h.lookup_prefix([k]) == 1, "an evicted block was lost"
                got = self.h.load([k])[0]
            assert same_bits(got, kv_of(k))


TestSpill = SpillMachine.TestCase
TestSpill.settings = settings(
    max_examples=25, stateful_step_count=15, deadline=None, suppress_health_check=list(HealthCheck)
)
