"""The admission load from the spill tiers (``engine.prefix_load``), the step the engine and
``kvcache tiers`` share: what it loads after the pool's hit, the block of the last token left to
compute, and nothing for a share group under k-anonymity."""

from __future__ import annotations

import torch
from tiers_helpers import LAYOUT, block, same_bits

from kvcache.cache.config import CacheConfig
from kvcache.cache.manager import BlockManager
from kvcache.cache.tenancy import Scope
from kvcache.engine.prefix_load import PrefixLoad, load_prefix
from kvcache.engine.scheduler import loadable_blocks
from kvcache.tiers import Hierarchy, HostTier

BS = LAYOUT.block_size  # 4 tokens


def setup(k_anonymity: int = 1) -> tuple[BlockManager, torch.Tensor, Hierarchy]:
    manager = BlockManager(
        CacheConfig(num_blocks=16, block_size=BS, model_id="tiny", k_anonymity=k_anonymity)
    )
    pool = torch.zeros(
        (LAYOUT.num_layers, 2, 16, BS, LAYOUT.kv_heads, LAYOUT.head_dim), dtype=LAYOUT.torch_dtype
    )
    return manager, pool, Hierarchy(LAYOUT, [HostTier(LAYOUT, 64)])


def test_the_held_blocks_after_the_hit_load_short_of_the_last_tokens_block() -> None:
    manager, pool, tiers = setup()
    tokens = list(range(100, 116))  # 16 tokens: 4 full blocks, the last token in block 3
    prompt = manager.hash(tokens, Scope("acme"))
    tiers.store(prompt.keys, torch.stack([block(i) for i in range(4)]))  # a tier holds all four
    assert list(loadable_blocks(prompt, 0, BS)) == [0, 1, 2]
    alloc = manager.allocate("r1", prompt)
    assert load_prefix(tiers, pool, manager.config, prompt, alloc) == PrefixLoad(0, 3, True)
    for i in range(3):
        assert same_bits(pool[:, :, alloc.block_ids[i]], block(i))
    assert not pool[:, :, alloc.block_ids[3]].any()  # computed by the forward, never loaded
    manager.free("r1")
    # One more token: block 3 is now full before the last token, so all four load.
    longer = manager.hash([*tokens, 116], Scope("acme"))
    assert list(loadable_blocks(longer, 0, BS)) == [0, 1, 2, 3]


def test_loading_starts_after_the_pools_hit_and_stops_at_the_first_block_no_tier_holds() -> None:
    manager, pool, tiers = setup()
    prompt = manager.hash(list(range(200, 221)), Scope("acme"))  # 21 tokens: 5 full blocks
    manager.allocate("warm", manager.hash(list(range(200, 208)), Scope("acme")))  # blocks 0-1 cached
    manager.free("warm")
    tiers.store(prompt.keys[2:4], torch.stack([block(2), block(3)]))  # block 4 is nowhere
    alloc = manager.allocate("r1", prompt)
    assert alloc.num_cached_tokens == 8
    assert load_prefix(tiers, pool, manager.config, prompt, alloc) == PrefixLoad(2, 2, True)
    assert same_bits(pool[:, :, alloc.block_ids[3]], block(3))


def test_a_share_group_under_k_anonymity_never_loads() -> None:
    manager, pool, tiers = setup(k_anonymity=2)
    tokens = list(range(300, 317))
    shared = manager.hash(tokens, Scope("acme", group="partners"))
    tiers.store(shared.keys, torch.stack([block(i) for i in range(4)]))
    alloc = manager.allocate("r1", shared)
    assert load_prefix(tiers, pool, manager.config, shared, alloc) == PrefixLoad(0)
    assert tiers.stats().blocks_loaded == 0 and not pool.any()
