"""The engine with a spill hierarchy: evicted blocks are written down and loaded back bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvcache import BlockStored, Scope, TierError
from kvcache.engine import Engine, EngineConfig
from kvcache.kernels.dispatch import pack_blocks
from kvcache.model import hf
from kvcache.tiers import DiskTier, Hierarchy, HostTier, LayoutFingerprint

BS = 16


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def loaded() -> hf.LoadedModel:
    return hf.load_model("tiny-llama", device="cpu", dtype=torch.float32)


def toks(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1024, (n,), generator=g).tolist()  # type: ignore[no-any-return]


@torch.inference_mode()
def full_logits(engine: Engine, tokens: list[int]) -> torch.Tensor:
    return engine.model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1].float()  # type: ignore[no-any-return]


def host_and_disk(tmp: Path, host_blocks: int) -> Callable[[LayoutFingerprint], Hierarchy]:
    def build(layout: LayoutFingerprint) -> Hierarchy:
        return Hierarchy(layout, [HostTier(layout, host_blocks, pin=False), DiskTier(tmp, 64)])

    return build


def test_evicted_prefix_comes_back_from_host_tier_bit_for_bit(loaded: hf.LoadedModel, tmp_path: Path) -> None:
    engine = Engine(loaded, EngineConfig(num_blocks=8, block_size=BS, tiers=host_and_disk(tmp_path, 16)))
    assert engine.tiers is not None
    a = toks(1, 100)  # 6 full blocks + 4 tokens: 7 of the 8 device blocks
    first = engine.generate(a, "t", max_new_tokens=4)
    a_ids = [e.block_id for e in engine.drain_events() if isinstance(e, BlockStored)][:6]
    before = pack_blocks(engine.pool, torch.tensor(a_ids)).clone()  # [6, L, 2, bs, H, D]
    engine.generate(toks(2, 120), "t", max_new_tokens=1)  # needs all 8 blocks: evicts a's
    assert engine.manager.lookup(a, "t") == 0
    assert engine.tiers.stats().blocks_offloaded >= 6

    logits, cached = engine.score(a, "t")
    assert cached == 96  # all 6 full blocks loaded from the host tier, none recomputed
    assert engine.tiers.stats().blocks_loaded == 6
    torch.testing.assert_close(logits, full_logits(engine, a), atol=1e-5, rtol=1e-5)
    again = engine.generate(a, "t", max_new_tokens=4)
    assert again.cached_tokens == 96 and again.output_tokens == first.output_tokens
    now_ids = [engine.manager.pool.index[k] for k in engine.manager.hash(a, "t").keys]
    assert torch.equal(pack_blocks(engine.pool, torch.tensor(now_ids)), before)
    engine.manager.check_invariants()


def test_tiers_keep_tenants_apart(loaded: hf.LoadedModel, tmp_path: Path) -> None:
    engine = Engine(loaded, EngineConfig(num_blocks=8, block_size=BS, tiers=host_and_disk(tmp_path, 16)))
    a = toks(3, 100)
    engine.generate(a, "alice", max_new_tokens=1)
    engine.generate(toks(4, 120), "alice", max_new_tokens=1)  # pushes a's blocks down
    assert engine.score(a, "bob")[1] == 0  # the same tokens in another scope: different keys
    assert engine.score(a, "alice")[1] == 96  # positive control


def test_hierarchy_for_another_layout_is_refused(loaded: hf.LoadedModel) -> None:
    other = LayoutFingerprint(
        "another-model", "float32", num_layers=2, kv_heads=2, head_dim=16, block_size=BS
    )
    with pytest.raises(TierError, match="another-model"):
        Engine(
            loaded,
            EngineConfig(
                num_blocks=8, block_size=BS, tiers=Hierarchy(other, [HostTier(other, 4, pin=False)])
            ),
        )


@pytest.mark.parametrize("k", [1, 2])
def test_share_group_under_k_anonymity_never_loads_from_tiers(
    loaded: hf.LoadedModel, tmp_path: Path, k: int
) -> None:
    engine = Engine(
        loaded,
        EngineConfig(num_blocks=8, block_size=BS, tiers=host_and_disk(tmp_path, 16), k_anonymity=k),
    )
    a = toks(5, 100)
    alice, bob = Scope("alice", group="team"), Scope("bob", group="team")
    engine.generate(a, alice, max_new_tokens=1)
    engine.generate(toks(6, 120), "carol", max_new_tokens=1)  # pushes alice's blocks down
    assert engine.manager.lookup(a, alice) == 0
    # k = 1: plain sharing, so bob loads the group's blocks from the tier (positive control);
    # k = 2: only alice wrote them, so bob must compute them as a miss, tier or no tier.
    assert engine.score(a, bob)[1] == (96 if k == 1 else 0)
