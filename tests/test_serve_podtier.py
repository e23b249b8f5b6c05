"""The pod tier of served engines over a real Redis: a prefix one worker computed is loaded by
another, outputs are unchanged, k-anonymous group blocks never come from it, and Redis going
away costs misses (counted), never a failed request."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from kvcache.cache.manager import BlockManager
from kvcache.cache.tenancy import Scope
from kvcache.engine import EngineConfig, Generation
from kvcache.redis_server import RedisServer, start_redis
from kvcache.serve.podtier import PodTieredEngine

PROMPT = [(7 * i) % 1000 + 1 for i in range(100)]  # 6 full blocks of 16, 4 tokens over


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with start_redis() as server:
        yield server


@pytest.fixture(scope="module")
def engine(redis: RedisServer) -> PodTieredEngine:
    tiers = PodTieredEngine.pod_tier(redis.url, capacity_blocks=4096)
    engine = PodTieredEngine.load("tiny", EngineConfig(num_blocks=64, block_size=16, seed=0, tiers=tiers))
    assert isinstance(engine, PodTieredEngine)
    return engine


def tier_tokens(gen: Generation) -> int:
    assert gen.timings is not None
    return gen.timings.tier_tokens


def fresh_worker(engine: PodTieredEngine, k: int = 1) -> None:
    """Forget the device cache, as another worker (or a restarted one) would have none of it."""
    engine.manager = BlockManager(dataclasses.replace(engine.manager.config, k_anonymity=k))


def test_another_worker_loads_the_prefix_from_the_pod_tier(engine: PodTieredEngine) -> None:
    first = engine.generate(PROMPT, Scope("acme"), max_new_tokens=5)
    assert (first.cached_tokens, tier_tokens(first)) == (0, 0)
    engine.write_through()
    fresh_worker(engine)
    second = engine.generate(PROMPT, Scope("acme"), max_new_tokens=5)
    assert (second.cached_tokens, tier_tokens(second)) == (96, 96)  # all 6 blocks from the pod tier
    assert second.output_tokens == first.output_tokens
    third = engine.generate(PROMPT, Scope("acme"), max_new_tokens=5)
    assert (third.cached_tokens, tier_tokens(third)) == (96, 0)  # now on the device
    fresh_worker(engine)
    other = engine.generate(PROMPT, Scope("globex"), max_new_tokens=5)
    assert (other.cached_tokens, tier_tokens(other)) == (0, 0)  # another tenant's keys differ


def test_group_blocks_under_k_anonymity_never_come_from_the_tier(engine: PodTieredEngine) -> None:
    group_prompt = PROMPT[::-1]
    fresh_worker(engine, k=1)  # stored without k-anonymity: the tier now holds the group's blocks
    engine.generate(group_prompt, Scope("initech", group="partners"), max_new_tokens=2)
    engine.write_through()
    fresh_worker(engine, k=2)
    probe = engine.generate(group_prompt, Scope("hooli", group="partners"), max_new_tokens=2)
    assert (probe.cached_tokens, tier_tokens(probe)) == (0, 0)  # gated: the tier is not asked
    fresh_worker(engine, k=1)
    control = engine.generate(group_prompt, Scope("piper", group="partners"), max_new_tokens=2)
    assert (control.cached_tokens, tier_tokens(control)) == (96, 96)


def test_redis_gone_means_counted_misses(engine: PodTieredEngine, redis: RedisServer) -> None:
    fresh_worker(engine)
    expected = engine.generate(PROMPT[:50], Scope("acme"), max_new_tokens=4).output_tokens
    engine.write_through()
    redis.stop()
    fresh_worker(engine)
    got = engine.generate(PROMPT[:50], Scope("acme"), max_new_tokens=4)
    assert (got.cached_tokens, tier_tokens(got)) == (0, 0)
    assert engine.last_tier_errors >= 1
    assert got.output_tokens == expected
    engine.write_through()  # the write fails too: counted, not raised
    assert engine.last_tier_errors >= 2
