"""Policies: exact choices on hand-made views, seeded tie-breaks, the published rules."""

from __future__ import annotations

import random
from collections import Counter

from kvcache.router.latency import LatencyModel
from kvcache.router.policies import POLICIES, RoutingInput, WorkerView, make_dynamo, make_sglang

LAT = LatencyModel()


def view(
    w: int, overlap: int = 0, active: int = 0, blocks: int = 0, pending: int = 0, queued: float = 0.0
) -> WorkerView:
    return WorkerView(w, overlap, active, blocks, pending, queued)


def inp(views: list[WorkerView], num_tokens: int = 64, turn: int = 0, seed: int = 0) -> RoutingInput:
    return RoutingInput(num_tokens, 16, views, LAT, turn, random.Random(seed))


def test_simple_policies() -> None:
    views = [view(0, overlap=3, active=5), view(1, overlap=1, active=1), view(2, active=2)]
    assert [POLICIES["round_robin"](inp(views, turn=t)) for t in range(4)] == [0, 1, 2, 0]
    assert POLICIES["least_loaded"](inp(views)) == 1
    assert POLICIES["lpm"](inp(views)) == 0
    assert {POLICIES["random"](inp(views, seed=s)) for s in range(20)} == {0, 1, 2}


def test_ties_do_not_favour_worker_zero() -> None:
    idle = [view(w) for w in range(4)]
    for name in ("least_loaded", "lpm", "dynamo", "affinity"):
        rng_inp = [inp(idle, seed=s) for s in range(40)]
        counts = Counter(POLICIES[name](i) for i in rng_inp)
        assert set(counts) == {0, 1, 2, 3}, name


def test_dynamo_cost() -> None:
    # worker 0: prefill (0 + 64 - 48)/16 = 1, decode 10 + 4 = 14 -> 15
    # worker 1: prefill (32 + 64)/16 = 6, decode 0 + 4 = 4 -> 10
    views = [view(0, overlap=3, blocks=10), view(1, pending=32)]
    assert make_dynamo()(inp(views)) == 1
    assert make_dynamo(overlap_weight=3.0)(inp(views)) == 0  # 3 + 14 = 17 < 18 + 4 = 22
    sampled = Counter(make_dynamo(temperature=1.0)(inp(views, seed=s)) for s in range(200))
    assert sampled[1] > sampled[0] > 0


def test_sglang_rules() -> None:
    policy = make_sglang()
    # balanced; best match ratio 48/64 > 0.3 -> the match
    assert policy(inp([view(0, overlap=3, active=9), view(1, active=1)])) == 0
    # match ratio 16/64 = 0.25 <= 0.3 -> least loaded
    assert policy(inp([view(0, overlap=1, active=9), view(1, active=1)])) == 1
    # imbalanced: 100 - 1 > 64 and 100 > 1.5 -> least loaded despite the match
    assert policy(inp([view(0, overlap=4, active=100), view(1, active=1)])) == 1


def test_affinity_prices_queue_against_reuse() -> None:
    affinity = POLICIES["affinity"]
    long = 16 * 400
    # A full prefix match with nothing queued wins.
    assert affinity(inp([view(0, overlap=399), view(1)], num_tokens=long)) == 0
    # A one-block match behind a long queue loses to an idle worker.
    assert affinity(inp([view(0, overlap=1, queued=5_000.0), view(1)], num_tokens=long)) == 1
    # The same match behind a short queue still wins over recomputing everything.
    assert affinity(inp([view(0, overlap=399, queued=50.0), view(1)], num_tokens=long)) == 0


def test_lpm_balanced_rules() -> None:
    policy = POLICIES["lpm_balanced"]
    # balanced: any match wins, even a one-block match of a long prompt (no ratio threshold)
    assert policy(inp([view(0, overlap=1, active=30), view(1, active=1)], num_tokens=16 * 40)) == 0
    # equal matches go to the less loaded worker
    assert policy(inp([view(0, overlap=2, active=9), view(1, overlap=2, active=3)])) == 1
    # 40 - 1 > 32 and 40 > 1.5: least loaded despite the match
    assert policy(inp([view(0, overlap=4, active=40), view(1, active=1)])) == 1
    # spread 33 > 32 but 103 < 1.5 x 70: still the match
    assert policy(inp([view(0, overlap=4, active=103), view(1, active=70)])) == 0
