"""The hierarchy: offload on eviction through a real BlockManager, promote on hit, demotion
cascade, cost rule, and a property: no interleaving of store/load/evict loses a block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from tiers_helpers import LAYOUT, block, key, same_bits

from kvcache import BlockManager, CacheConfig, CapacityError
from kvcache.costs import LatencyModel
from kvcache.errors import TierError
from kvcache.kernels.dispatch import pack_blocks, unpack_blocks
from kvcache.tiers import (
    DiskTier,
    Hierarchy,
    HostTier,
    IcmsTier,
    InProcessBackend,
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


def test_a_damaged_block_falls_back_to_another_copy_or_truncates_the_load(tmp_path: Path) -> None:
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
    # With a second copy in the shared tier, the damaged disk copy is dropped and the shared one serves.
    icms = IcmsTier(InProcessBackend(8), write_behind_blocks=1)
    h2 = Hierarchy(LAYOUT, [DiskTier(tmp_path / "b", 8), icms], TierPolicy(promote_on_hit=False))
    h2.store(keys(0, 1, 2), torch.stack([block(i) for i in range(3)]))
    damaged = h2.tiers[0].path(key(1))  # type: ignore[attr-defined]
    damaged.write_bytes(damaged.read_bytes()[:-5])
    packed = h2.load(keys(0, 1, 2))
    assert packed.shape[0] == 3 and all(same_bits(packed[i], block(i)) for i in range(3))
    assert (h2.tiers[0].stats.corrupt, icms.stats.hits) == (1, 1)


def test_cost_rule_declines_loads_slower_than_recompute() -> None:
    slow = TransferModel(bandwidth_bytes_per_s=1e3, base_latency_ms=1.0)  # 512 bytes = 512 ms
    dear = TierPolicy(prefill=LatencyModel(prefill_ms_per_token=1.0))  # 1 ms per token recomputed
    h = Hierarchy(LAYOUT, [HostTier(LAYOUT, 4)], dear, transfer=[slow])
    h.store(keys(0, 1), torch.stack([block(0), block(1)]))
    assert h.load(keys(0, 1)).shape[0] == 0
    assert h.stats().blocks_declined == 2
    with pytest.raises(TierError, match="needs one TransferModel per tier"):
        Hierarchy(LAYOUT, [HostTier(LAYOUT, 4)], TierPolicy(prefill=LatencyModel(prefill_ms_per_token=1.0)))


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
    c = manager.allocate("c", prompt[:8])  # both blocks come back from G2 instead of a recompute
    assert c.num_cached_tokens == 0 and h.restore(pool, c.block_ids[:2], ks[:2]) == 2
    restored = pack_blocks(pool, torch.tensor(c.block_ids[:2]))
    assert same_bits(restored[0], kv_of(ks[0])) and same_bits(restored[1], kv_of(ks[1]))
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


class TierMachine(RuleBasedStateMachine):
    """Random store/load/remove/corrupt/flush straight on a hierarchy whose G2 (2 blocks) and G3
    (3 blocks) overflow constantly, over a shared tier large enough for everything. A load never
    returns wrong bytes, and every stored, not removed block stays loadable."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.tmp = tempfile.TemporaryDirectory()
        self.g3 = DiskTier(self.tmp.name, 3)
        self.icms = IcmsTier(InProcessBackend(1000), write_behind_blocks=3)
        self.h = Hierarchy(LAYOUT, [HostTier(LAYOUT, 2), self.g3, self.icms])
        self.live: set[int] = set()

    def teardown(self) -> None:
        self.tmp.cleanup()

    @rule(ids=st.lists(st.integers(0, 9), min_size=1, max_size=4, unique=True))
    def store(self, ids: list[int]) -> None:
        self.h.store(keys(*ids), torch.stack([block(i) for i in ids]))
        self.live.update(ids)

    @rule(ids=st.lists(st.integers(0, 9), min_size=1, max_size=5, unique=True))
    def load(self, ids: list[int]) -> None:
        packed = self.h.load(keys(*ids))
        for i, got in zip(ids, packed, strict=False):
            assert same_bits(got, block(i)), "served wrong bytes"

    @rule(i=st.integers(0, 9))
    def remove(self, i: int) -> None:
        self.h.remove(keys(i))
        self.live.discard(i)

    @rule(i=st.integers(0, 9))
    def corrupt_on_disk(self, i: int) -> None:
        path = self.g3.path(key(i))
        if path.exists():
            data = bytearray(path.read_bytes())
            data[-1] ^= 0xFF
            path.write_bytes(bytes(data))

    @rule()
    def flush(self) -> None:
        self.h.flush()

    @invariant()
    def nothing_stored_is_lost(self) -> None:
        for i in self.live:
            got = self.h.load(keys(i))  # a damaged disk copy is dropped and the shared copy serves
            assert got.shape[0] == 1, f"block {i} was lost"
            assert same_bits(got[0], block(i))


TestTiers = TierMachine.TestCase
TestTiers.settings = settings(
    max_examples=25, stateful_step_count=15, deadline=None, suppress_health_check=list(HealthCheck)
)


def test_policy_switches_and_a_failing_offload_never_breaks_an_allocation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manager = BlockManager(CacheConfig(num_blocks=2, block_size=4, model_id="tiny"))
    pool = torch.zeros(2, 2, 2, 4, 2, 8, dtype=torch.bfloat16)
    off = Hierarchy(
        LAYOUT, [HostTier(LAYOUT, 8)], TierPolicy(offload_on_evict=False, prefetch_on_route=False)
    )
    manager.set_evict_hook(off.evict_hook(pool))
    manager.allocate("a", list(range(8)))
    manager.free("a")
    manager.allocate("b", list(range(100, 108)))
    manager.free("b")
    assert off.stats().blocks_offloaded == 0 and off.prefetch(keys(0)) == 0

    g2 = HostTier(LAYOUT, 8)
    h = Hierarchy(LAYOUT, [g2])
    manager.set_evict_hook(h.evict_hook(pool))

    def disk_full(key: object, block: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(g2, "store", disk_full)
    c = manager.allocate("c", list(range(200, 208)))  # evicts b's two blocks: both offloads fail
    assert len(c.block_ids) == 2
    manager.check_invariants()
    assert (h.stats().offload_errors, h.stats().blocks_offloaded) == (2, 0)


def test_lookup_checks_keys_window_by_window_and_stops_at_the_first_gap(tmp_path: Path) -> None:
    g2, g3 = HostTier(LAYOUT, 200), DiskTier(tmp_path, 8)
    h = Hierarchy(LAYOUT, [g2, g3])
    h.store(keys(*range(150)), torch.stack([block(i % 7) for i in range(150)]))
    g3.store(key(150), block(150 % 7))  # one more, only on disk
    asked: list[int] = []
    real = g3.contains_many
    g3.contains_many = lambda ks: asked.append(len(ks)) or real(ks)  # type: ignore[method-assign]
    assert h.lookup_prefix(keys(*range(1000))) == 151
    # windows 0-63 and 64-127 are all in G2; in 128-191 G2 holds 22 and disk is asked for the other
    # 42; the 150th key is on disk, the 151st nowhere, so no window after it is checked
    assert asked == [42]
