"""kvcache's block manager against a faithful re-implementation of vLLM v1's BlockPool path.

Both sides run the same request model on the same token lists, in one process:

    for each request: hash its full blocks -> longest cached prefix (capped at len-1 tokens) ->
    pin the hits, take new blocks with eviction, cache every full block (prefill done) ->
    release it once 8 newer requests were admitted (tail blocks first).

A request that does not fit waits for the oldest running one to be released (then retries); a
request larger than the whole pool is left out of the workload on both sides. Block size 16, the
same usable capacity on both sides (vLLM's null block is added on top). Isolation: each tenant's
requests carry ``cache_salt=tenant`` on the vLLM side and ``Scope(tenant)`` on kvcache's, so
neither shares across tenants; the salted cases give 30% of requests a salt of their own.

Workloads: the multi-turn chat of ``bench_manager`` (384 requests of 8 tenants, 1.3-3.2k tokens)
and the first 200 requests of the shared Mooncake trace (``../shared/traces``), each 512-token
``hash_id`` expanded into 512 deterministic token ids (so equal ids give equal 16-token blocks).

    pytest benches/bench_vs_vllm.py --benchmark-only       # pytest-benchmark groups
    python benches/bench_vs_vllm.py --rounds 7             # interleaved rounds: the README table
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vllm_blockpool import VllmKVCacheManager, hash_request

from kvcache import BlockManager, CacheConfig, Scope
from kvcache.lab.workloads import multi_turn_chat

BLOCK_SIZE = 16
VOCAB = 152_064
IN_FLIGHT = 8
TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"
MOONCAKE_REQUESTS = 200

# (tokens, kvcache scope or None, vLLM cache_salt or None)
Work = list[tuple[list[int], Scope | None, str | None]]


def chat_work(salted_fraction: float = 0.0) -> Work:
    reqs = multi_turn_chat(
        num_tenants=8,
        sessions_per_tenant=8,
        turns=6,
        system_prompt_tokens=1024,
        user_tokens=256,
        output_tokens=128,
        vocab_size=VOCAB,
        seed=0,
    )
    salted = np.random.default_rng(1).random(len(reqs)) < salted_fraction
    work: Work = []
    for i, r in enumerate(reqs):
        name = f"{r.tenant}#salt{i}" if salted[i] else r.tenant
        work.append((list(r.tokens or ()), Scope(name), name))
    return work


def mooncake_work(path: Path = TRACE, num_requests: int = MOONCAKE_REQUESTS) -> Work:
    work: Work = []
    with path.open() as f:
        for line, _ in zip(f, range(num_requests), strict=False):
            obj = json.loads(line)
            ids = np.asarray(obj["hash_ids"], dtype=np.int64)
            pos = np.arange(512, dtype=np.int64)
            toks = ((ids[:, None] * 512 + pos[None, :]) * 2_654_435_761 + 12_345) % (VOCAB - 1) + 1
            work.append((toks.reshape(-1)[: obj["input_length"]].tolist(), None, None))
    return work


def fits(work: Work, num_blocks: int) -> Work:
    return [w for w in work if -(-len(w[0]) // BLOCK_SIZE) <= num_blocks]


def run_kvcache(work: Work, num_blocks: int) -> tuple[int, int]:
    """Returns (query tokens, hit tokens) of the admitted requests."""
    manager = BlockManager(CacheConfig(num_blocks=num_blocks, block_size=BLOCK_SIZE, vocab_size=VOCAB))
    running: deque[int] = deque()
    for i, (tokens, scope, _salt) in enumerate(work):
        if len(running) == IN_FLIGHT:
            manager.free(running.popleft())
        prompt = manager.hash(tokens, scope)
        alloc = manager.try_allocate(i, prompt)
        while alloc is None and running:
            manager.free(running.popleft())
            alloc = manager.try_allocate(i, prompt)
        if alloc is not None:
            running.append(i)
    while running:
        manager.free(running.popleft())
    stats = manager.stats()
    return stats.query_tokens, stats.hit_tokens


def run_vllm(work: Work, num_blocks: int) -> tuple[int, int]:
    manager = VllmKVCacheManager(num_blocks, BLOCK_SIZE)
    running: deque[int] = deque()
    for i, (tokens, _scope, salt) in enumerate(work):
        if len(running) == IN_FLIGHT:
            manager.free(running.popleft())
        hashes = hash_request(tokens, BLOCK_SIZE, salt)
        n = len(tokens)
        blocks = manager.allocate_slots(i, hashes, n, manager.get_computed_blocks(hashes, n))
        while blocks is None and running:
            manager.free(running.popleft())
            blocks = manager.allocate_slots(i, hashes, n, manager.get_computed_blocks(hashes, n))
        if blocks is not None:
            running.append(i)
    while running:
        manager.free(running.popleft())
    return manager.queries, manager.hits


def hash_only_kvcache(work: Work, num_blocks: int) -> None:
    manager = BlockManager(CacheConfig(num_blocks=num_blocks, block_size=BLOCK_SIZE, vocab_size=VOCAB))
    for tokens, scope, _salt in work:
        manager.hash(tokens, scope)


def hash_only_vllm(work: Work, num_blocks: int) -> None:
    for tokens, _scope, salt in work:
        hash_request(tokens, BLOCK_SIZE, salt)


CASES: dict[str, tuple[Callable[[], Work], int]] = {
    "chat-512": (chat_work, 512),
    "chat-4096": (chat_work, 4096),
    "chat-salted30-512": (lambda: chat_work(0.3), 512),
    "chat-salted30-4096": (lambda: chat_work(0.3), 4096),
    "mooncake200-4096": (mooncake_work, 4096),
    "mooncake200-16384": (mooncake_work, 16384),
}


def _case_ids() -> list[str]:
    return [c for c in CASES if not c.startswith("mooncake") or TRACE.exists()]


@pytest.fixture(scope="module", params=_case_ids())
def case(request: pytest.FixtureRequest) -> tuple[str, Work, int]:
    make, num_blocks = CASES[request.param]
    return request.param, fits(make(), num_blocks), num_blocks


def _bench(benchmark: Any, case: tuple[str, Work, int], fn: Callable[[Work, int], tuple[int, int]]) -> None:
    name, work, num_blocks = case
    benchmark.group = f"vs vLLM BlockPool: {name}"
    benchmark.extra_info["tokens"] = sum(len(w[0]) for w in work)
    queries, hits = benchmark.pedantic(lambda: fn(work, num_blocks), rounds=5, iterations=1)
    benchmark.extra_info["hit_rate"] = hits / queries
    assert queries == benchmark.extra_info["tokens"]


def test_vllm_blockpool_baseline(benchmark: Any, case: tuple[str, Work, int]) -> None:
    _bench(benchmark, case, run_vllm)


def test_kvcache_manager(benchmark: Any, case: tuple[str, Work, int]) -> None:
    _bench(benchmark, case, run_kvcache)


def _timed(fn: Callable[[Work, int], Any], work: Work, num_blocks: int) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    out = fn(work, num_blocks)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cases", nargs="*", default=_case_ids())
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cpus")
    print(
        f"{'case':<20} {'tokens':>9} {'vLLM Mtok/s':>11} {'kvcache':>8} {'ratio med':>9} {'ratio range':>12} "
        f"{'mgmt ratio':>10} {'hit vLLM':>8} {'hit kvc':>8}"
    )
    for name in args.cases:
        make, num_blocks = CASES[name]
        work = fits(make(), num_blocks)
        tokens = sum(len(w[0]) for w in work)
        ratios, mgmt, v_rates, k_rates = [], [], [], []
        hit_v = hit_k = 0.0
        for r in range(args.rounds):
            order: list[tuple[str, Callable[[Work, int], tuple[int, int]]]] = [
                ("v", run_vllm),
                ("k", run_kvcache),
            ]
            if r % 2:
                order.reverse()
            times: dict[str, float] = {}
            for side, fn in order:
                times[side], (q, h) = _timed(fn, work, num_blocks)
                if side == "v":
                    hit_v = h / q
                else:
                    hit_k = h / q
            hv, _ = _timed(hash_only_vllm, work, num_blocks)
            hk, _ = _timed(hash_only_kvcache, work, num_blocks)
            ratios.append(times["v"] / times["k"])
            mgmt.append(max(times["v"] - hv, 1e-9) / max(times["k"] - hk, 1e-9))
            v_rates.append(tokens / times["v"] / 1e6)
            k_rates.append(tokens / times["k"] / 1e6)
        print(
            f"{name:<20} {tokens:>9} {statistics.median(v_rates):>11.2f} {statistics.median(k_rates):>8.2f} "
            f"{statistics.median(ratios):>8.2f}x {min(ratios):>5.2f}-{max(ratios):.2f}x "
            f"{statistics.median(mgmt):>9.2f}x {hit_v:>8.4f} {hit_k:>8.4f}"
        )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
