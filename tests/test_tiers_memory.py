"""G2 (host slab): bitwise round trips, LRU eviction order, demotion, layouts."""

from __future__ import annotations

import pytest
import torch
from tiers_helpers import LAYOUT, LAYOUT_F32, block, key, same_bits

from kvcache.errors import TierError
from kvcache.tiers import HostTier, Tier, TierKey

TIERS = [lambda n: HostTier(LAYOUT, n)]


@pytest.mark.parametrize("make", TIERS, ids=["G2"])
def test_round_trip_lru_and_demotion(make) -> None:  # type: ignore[no-untyped-def]
    tier: Tier = make(3)
    demoted: list[tuple[int, torch.Tensor]] = []
    tier.on_evict = lambda k, b: demoted.append((int.from_bytes(k.key, "little"), b.clone()))
    for i in range(3):
        tier.store(key(i), block(i))
    assert same_bits(tier.load(key(0)), block(0))  # 0 becomes most recent: 1 is now oldest
    tier.store(key(3), block(3))
    tier.store(key(4), block(4))
    assert [i for i, _ in demoted] == [1, 2]
    assert all(same_bits(b, block(i)) for i, b in demoted)
    assert [tier.contains(key(i)) for i in range(5)] == [True, False, False, True, True]
    for i in (0, 3, 4):
        assert same_bits(tier.load(key(i)), block(i))
    assert tier.load(key(1)) is None
    out = torch.empty(LAYOUT.block_shape, dtype=torch.bfloat16)
    assert tier.load(key(4), out) is out and same_bits(out, block(4))
    s = tier.stats
    assert (s.hits, s.misses, s.blocks_in, s.evictions, s.occupancy_blocks, s.capacity_blocks) == (
        5,
        1,
        5,
        2,
        3,
        3,
    )
    assert s.bytes_out == 5 * LAYOUT.block_nbytes
    assert tier.remove(key(3)) and not tier.remove(key(3)) and len(tier) == 2
    assert tier.lookup_prefix([key(0), key(4), key(3)]) == 2


@pytest.mark.parametrize("make", TIERS, ids=["G2"])
def test_other_layout_is_refused_on_store_and_a_miss_on_load(make) -> None:  # type: ignore[no-untyped-def]
    tier: Tier = make(2)
    tier.store(key(1), block(1))
    with pytest.raises(TierError, match="cannot store"):
        tier.store(key(1, LAYOUT_F32), block(1, LAYOUT_F32))
    with pytest.raises(TierError, match="does not match layout"):
        tier.store(key(2), block(2, LAYOUT_F32))
    assert not tier.contains(key(1, LAYOUT_F32))
    assert tier.load(key(1, LAYOUT_F32)) is None
    assert len(tier) == 1


def test_host_slab_is_block_major() -> None:
    tier = HostTier(LAYOUT, 2, pin=False)
    assert tuple(tier.slab.shape) == (2, 2, 2, 4, 2, 8)
    tier.store(key(7), block(7))
    assert same_bits(tier.slab[0], block(7))
    assert TierKey(key(7).key, LAYOUT) == key(7)
