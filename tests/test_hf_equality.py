"""Cached-prefix runs equal full uncached runs, for every supported model family.

For each tiny random-weight family (float32, CPU): the next-token logits of the engine's prefill,
which loads the cached prefix from the paged pool and runs the model on the suffix only, equal the
logits of one plain forward over the whole prompt with no cache at all; greedy generations are
token-identical to greedy decoding by full recomputation. Prefix hits of 0%, partial and all but
one block; tenants sharing a published system prompt, and tenants that must not share.
"""

from __future__ import annotations

import functools

import pytest
import torch
from reference import full_greedy, full_logits

from kvcache import Scope
from kvcache.engine import Engine, EngineConfig
from kvcache.model import hf

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2", "tiny-phi"]
BS = 16
ATOL = 1e-5  # float32 on CPU; observed differences are 0 or a few ulps


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@functools.cache
def _loaded(name: str) -> hf.LoadedModel:
    return hf.load_model(name, device="cpu", dtype=torch.float32)  # the exact contract: float32 CPU


def fresh(name: str) -> Engine:
    """A new engine (empty pool and index) around the family's model, loaded once per session."""
    return Engine(_loaded(name), EngineConfig(num_blocks=64, block_size=BS))


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1024, (n,), generator=g).tolist()  # type: ignore[no-any-return]


def assert_same(engine: Engine, tokens: list[int], scope: Scope | str, expect_cached: int) -> None:
    logits, cached = engine.score(tokens, scope)
    assert cached == expect_cached
    torch.testing.assert_close(logits, full_logits(engine, tokens), atol=ATOL, rtol=ATOL)
    gen = engine.generate(tokens, scope, max_new_tokens=20)
    # score() cached every full block in this scope: now all but the last token's block is a hit
    assert gen.cached_tokens == (len(tokens) - 1) // BS * BS
    assert gen.output_tokens == full_greedy(engine, tokens, 20)
    engine.manager.check_invariants()


@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_hits_zero_partial_and_all_but_one_block(name: str) -> None:
    engine = fresh(name)
    p = prompt(1, 96)  # exactly 6 blocks
    assert_same(engine, p[:40], "a", expect_cached=0)  # 0%: nothing cached yet
    assert_same(engine, p[:90], "a", expect_cached=32)  # partial: the 2 full blocks of p[:40]
    # p[:90] cached blocks 0..4 (80 tokens); generate() extended it by decode, but the 6th block
    # holds decoded tokens, not p[80:96], so a 96-token prompt hits 5 blocks: all but one.
    assert_same(engine, p, "a", expect_cached=80)
    assert_same(engine, p, "a", expect_cached=80)  # fully cached: the last block is recomputed


@pytest.mark.parametrize("name", FAMILIES)
def test_tenants_share_public_system_prompt_and_nothing_else(name: str) -> None:
    engine = fresh(name)
    system = prompt(2, 48)  # 3 blocks
    assert engine.publish(system) == 3
    private = prompt(3, 50)
    alice, bob = Scope("alice"), Scope("bob")
    assert_same(engine, system + private, alice, expect_cached=0)
    # bob sends the very same tokens: he gets the public system prompt, never alice's private part
    assert_same(engine, system + private, bob, expect_cached=48)
    # positive control: alice's own repeat hits her private blocks too (6 full blocks of 98 tokens)
    assert_same(engine, system + private, alice, expect_cached=96)


@pytest.mark.parametrize("name", FAMILIES)
def test_share_group_members_share_and_outsiders_do_not(name: str) -> None:
    engine = fresh(name)
    p = prompt(4, 70)
    a, b, c = Scope("a", group="team"), Scope("b", group="team"), Scope("c")
    assert_same(engine, p, a, expect_cached=0)
    assert_same(engine, p, c, expect_cached=0)  # outsider: no hit although the tokens are equal
    assert_same(engine, p, b, expect_cached=64)  # same group: all 4 full blocks
