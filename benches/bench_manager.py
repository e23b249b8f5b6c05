"""Block manager throughput: allocate+free latency, lookup rate, a multi-tenant replay, quotas.

The replay drives a multi-turn multi-tenant chat workload through hash + try_allocate + free
with 8 requests in flight at block size 16, and reports prompt tokens per second (the target
is 5M tokens/s on a 2-core machine). The baseline of each group is the same work without reuse
(an empty cache, so every block is new), which is what a manager without prefix caching does.
The quota group allocates while another tenant's floor protects the oldest 16k cached blocks,
against the same allocation without quotas.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

import numpy as np
import pytest

from kvcache import BlockManager, CacheConfig, Scope, TenantQuota
from kvcache.lab.workloads import multi_turn_chat

BLOCK_SIZE = 16
VOCAB = 152_064


def fresh_manager(num_blocks: int) -> BlockManager:
    return BlockManager(CacheConfig(num_blocks=num_blocks, block_size=BLOCK_SIZE, vocab_size=VOCAB))


@pytest.mark.parametrize("num_tokens", [2048, 32_768, 131_072])
@pytest.mark.parametrize("hit_fraction", [0.0, 0.5, 1.0])
def test_allocate_free(benchmark: Any, num_tokens: int, hit_fraction: float) -> None:
    """One allocate + free of a prompt whose first ``hit_fraction`` is cached."""
    benchmark.group = f"allocate+free {num_tokens // 1024}k tokens"
    if hit_fraction == 0.0:
        benchmark.name = benchmark.name.replace("test_allocate_free", "test_allocate_free_baseline")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, VOCAB, num_tokens).tolist()
    manager = fresh_manager(2 * num_tokens // BLOCK_SIZE + 8)
    cached = int(num_tokens * hit_fraction)
    if cached:
        manager.allocate("warm", prompt[:cached], "t")
        manager.free("warm")
    counter = iter(range(10**9))
    tail = rng.integers(0, VOCAB, num_tokens - cached).tolist()

    def run() -> int:
        rid = next(counter)
        # a fresh suffix each time so the hit fraction stays what was asked
        tokens = prompt[:cached] + [(t + rid) % VOCAB for t in tail[:1]] + tail[1:]
        a = manager.allocate(rid, tokens, "t")
        manager.free(rid)
        return a.num_cached_tokens

    benchmark.extra_info["tokens"] = num_tokens
    hit = benchmark(run)
    assert hit >= min(cached, num_tokens - BLOCK_SIZE) - BLOCK_SIZE


@pytest.mark.benchmark(group="lookup 32k tokens")
def test_lookup(benchmark: Any) -> None:
    manager = fresh_manager(4096)
    prompt = np.random.default_rng(1).integers(0, VOCAB, 32_768).tolist()
    manager.allocate("warm", prompt, "t")
    hashed = manager.hash(prompt, "t")
    benchmark.extra_info["tokens"] = len(prompt)
    assert benchmark(manager.lookup, hashed) == 32_768


def replay(manager: BlockManager, requests: list[Any], in_flight: int = 8) -> int:
    running: deque[int] = deque()
    scopes: dict[str, Scope] = {}
    for i, req in enumerate(requests):
        scope = scopes.get(req.tenant) or scopes.setdefault(req.tenant, Scope(req.tenant))
        if len(running) == in_flight:
            manager.free(running.popleft())
        prompt = manager.hash(req.tokens, scope)
        alloc = manager.try_allocate(i, prompt)
        assert alloc is not None, "the replay's pool holds every request in flight"
        running.append(i)
    while running:
        manager.free(running.popleft())
    return manager.stats().hit_tokens


@pytest.fixture(scope="module")
def chat() -> list[Any]:
    return multi_turn_chat(
        num_tenants=8,
        sessions_per_tenant=8,
        turns=6,
        system_prompt_tokens=1024,
        user_tokens=256,
        output_tokens=128,
        vocab_size=VOCAB,
        seed=0,
    )


@pytest.mark.benchmark(group="replay multi-turn multi-tenant, 8 in flight")
def test_replay_baseline_no_reuse(benchmark: Any, chat: list[Any]) -> None:
    """Same requests, each tenant's session salted so nothing is ever reused."""
    salted = [dataclasses.replace(r, tenant=f"{r.tenant}/{i}") for i, r in enumerate(chat)]
    benchmark.extra_info["tokens"] = sum(r.num_tokens for r in chat)
    benchmark.pedantic(lambda: replay(fresh_manager(16_384), salted), rounds=5, iterations=1)


@pytest.mark.benchmark(group="replay multi-turn multi-tenant, 8 in flight")
def test_replay_kvcache(benchmark: Any, chat: list[Any]) -> None:
    benchmark.extra_info["tokens"] = sum(r.num_tokens for r in chat)
    hits = benchmark.pedantic(lambda: replay(fresh_manager(16_384), chat), rounds=5, iterations=1)
    assert hits > 0.5 * benchmark.extra_info["tokens"]


PROTECTED_BLOCKS = 16_384


def quota_manager(with_quotas: bool) -> BlockManager:
    """A full pool whose oldest 16k cached blocks belong to a tenant at its floor, then 1k of
    another tenant's cached blocks."""
    quotas = {"alice": TenantQuota(floor_blocks=PROTECTED_BLOCKS)} if with_quotas else {}
    manager = BlockManager(
        CacheConfig(num_blocks=PROTECTED_BLOCKS + 1024, block_size=BLOCK_SIZE, quotas=quotas)
    )
    rng = np.random.default_rng(2)
    manager.allocate("alice", rng.integers(0, VOCAB, PROTECTED_BLOCKS * BLOCK_SIZE).tolist(), "alice")
    manager.free("alice")
    manager.allocate("bob", rng.integers(0, VOCAB, 1024 * BLOCK_SIZE).tolist(), "bob")
    manager.free("bob")
    return manager


def allocate_evicting(manager: BlockManager, prompts: list[list[int]], counter: Any) -> int:
    """One allocate + free of a 64-block prompt that evicts 64 cached blocks."""
    rid = next(counter)
    alloc = manager.allocate(rid, prompts[rid % len(prompts)], "carol")
    manager.free(rid)
    return alloc.num_cached_tokens


@pytest.mark.parametrize("with_quotas", [False, True], ids=["baseline_no_quotas", "floor_protects_16k"])
def test_allocate_with_quotas(benchmark: Any, with_quotas: bool) -> None:
    benchmark.group = "allocate 64 evicting blocks, 16k blocks protected by a floor"
    manager = quota_manager(with_quotas)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, 64 * BLOCK_SIZE).tolist() for _ in range(64)]
    benchmark.extra_info["tokens"] = 64 * BLOCK_SIZE
    benchmark(allocate_evicting, manager, prompts, iter(range(10**9)))
    owned = manager.stats().owned_blocks.get("alice", 0)
    assert owned == PROTECTED_BLOCKS if with_quotas else owned < PROTECTED_BLOCKS
