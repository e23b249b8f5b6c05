"""The candidate policies (exploit/explore, bounded-load hashing, dynamo with a band, softmax
among near-ties, output blocks in the footprint): exact choices on hand-made views, seeded
sampling, and what the router hands them."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from kvcache.cache.hashing import checksum
from kvcache.costs import LatencyModel
from kvcache.errors import ConfigError
from kvcache.router.policies import (
    POLICIES,
    RoutingInput,
    WorkerView,
    make_affinity_decode,
    make_affinity_output,
    make_affinity_release,
    make_affinity_softmax,
    make_bounded_hash,
    make_dynamo_band,
    make_exploit_explore,
)
from kvcache.router.router import Router, RouteRequest

LAT = LatencyModel()
KEY = b"k" * 16


def view(
    w: int, overlap: int = 0, active: int = 0, blocks: int = 0, queued: float = 0.0, held: int = 0
) -> WorkerView:
    return WorkerView(w, overlap, active, blocks, 0, queued, held)


def inp(
    views: list[WorkerView],
    num_tokens: int = 64,
    seed: int = 0,
    keys: tuple[bytes, ...] = (),
    cap: int | None = None,
    service: float = 0.0,
    output_tokens: int = 1,
) -> RoutingInput:
    return RoutingInput(num_tokens, 16, views, LAT, 0, random.Random(seed), cap, service, output_tokens, keys)


def test_candidates_are_registered() -> None:
    for name in (
        "exploit_explore",
        "bounded_hash",
        "dynamo_band",
        "affinity_softmax",
        "affinity_output",
        "affinity_decode",
        "affinity_release",
    ):
        assert name in POLICIES


def test_exploit_explore_exploits_a_long_match_whatever_the_queue() -> None:
    policy = make_exploit_explore(0.5)
    long = 16 * 40
    # 30 of 40 blocks cached (0.75 > 0.5): the match wins behind a 20 s queue
    assert policy(inp([view(0, overlap=30, queued=20_000.0), view(1)], num_tokens=long)) == 0
    # 10 of 40 (0.25): explore, the idle worker's lower modelled TTFT wins
    assert policy(inp([view(0, overlap=10, queued=20_000.0), view(1)], num_tokens=long)) == 1
    # exploiting, equal matches go to the lower modelled TTFT
    views = [view(0, overlap=30, queued=900.0), view(1, overlap=30, queued=100.0), view(2)]
    assert policy(inp(views, num_tokens=long)) == 1
    # a higher threshold explores the 0.75 match too
    assert (
        make_exploit_explore(0.8)(inp([view(0, overlap=30, queued=20_000.0), view(1)], num_tokens=long)) == 1
    )


def _home_order(key: bytes, workers: list[int]) -> list[int]:
    return sorted(workers, key=lambda w: checksum(key + repr(w).encode()), reverse=True)


def test_bounded_hash_sends_a_key_home_and_spills_past_the_cap() -> None:
    policy = make_bounded_hash(1.25)
    order = _home_order(KEY, [0, 1, 2, 3])
    home, second = order[0], order[1]
    idle = [view(w) for w in range(4)]
    # every seed: the key's home, no sampling
    assert {policy(inp(idle, seed=s, keys=(KEY, b"x" * 16))) for s in range(10)} == {home}
    # 8 active in all: cap ceil(1.25 x 9 / 4) = 3; the home holds 2 (+1 fits)
    loads = {w: 2 for w in range(4)}
    assert policy(inp([view(w, active=loads[w]) for w in range(4)], keys=(KEY,))) == home
    loads = {w: (4 if w == home else 2) for w in range(4)}
    # 10 active: cap ceil(1.25 x 11 / 4) = 4; the home's 4 + 1 > 4 -> the key's next worker
    assert policy(inp([view(w, active=loads[w]) for w in range(4)], keys=(KEY,))) == second
    # a larger load factor keeps it home: ceil(2 x 11 / 4) = 6
    assert make_bounded_hash(2.0)(inp([view(w, active=loads[w]) for w in range(4)], keys=(KEY,))) == home


def test_bounded_hash_keys_on_the_chosen_block_and_without_keys_takes_the_least_loaded() -> None:
    other = b"o" * 16
    idle = [view(w) for w in range(8)]
    assert (
        make_bounded_hash(key_blocks=2)(inp(idle, keys=(KEY, other))) == _home_order(other, list(range(8)))[0]
    )
    # fewer blocks than key_blocks: the last one
    assert make_bounded_hash(key_blocks=3)(inp(idle, keys=(KEY,))) == _home_order(KEY, list(range(8)))[0]
    assert make_bounded_hash()(inp([view(0, active=3), view(1, active=1), view(2, active=2)])) == 1


def test_dynamo_band_prefers_the_match_inside_the_band_only() -> None:
    policy = make_dynamo_band(1.0, 0.5)
    # 64 tokens = 4 blocks, band 0.5 x 4 = 2 blocks of logit.
    # worker 0: prefill (64 - 16)/16 = 3, decode 2 + 4 = 6 -> 9; worker 1: 4 + 0 + 4 = 8 (lowest)
    assert policy(inp([view(0, overlap=1, blocks=2), view(1)])) == 0  # 9 <= 8 + 2: the match
    # worker 0 with decode 5 + 4 -> 12 > 10: the lowest logit
    assert policy(inp([view(0, overlap=1, blocks=5), view(1)])) == 1
    assert POLICIES["dynamo"](inp([view(0, overlap=1, blocks=2), view(1)])) == 1  # dynamo alone: 8 < 9


def test_affinity_softmax_samples_near_ties_only_and_is_seeded() -> None:
    policy = make_affinity_softmax(0.5, 0.25)
    long = 16 * 100
    band = 0.5 * LAT.prefill_ms(long, 0, 0)
    views = [view(0), view(1, queued=band / 2), view(2, queued=10 * band)]
    picks = [policy(inp(views, num_tokens=long, seed=s)) for s in range(200)]
    assert set(picks) == {0, 1}  # worker 2 is outside the band
    assert picks.count(0) > picks.count(1) > 0  # exp(-2) against 1: the lower cost more often
    assert picks == [
        policy(inp(views, num_tokens=long, seed=s)) for s in range(200)
    ]  # same seeds, same picks
    # exactly the seeded draw the docstring states: weights 1 and exp(-(band / 2) / band / 0.25)
    for seed in range(20):
        expected = random.Random(seed).choices([0, 1], [1.0, math.exp(-2.0)])[0]
        assert policy(inp(views, num_tokens=long, seed=seed)) == expected
    # alone in the band: no draw
    assert policy(inp([view(0), view(1, queued=10 * band)], num_tokens=long)) == 0
    with pytest.raises(ConfigError, match="temperature"):
        make_affinity_softmax(temperature=0.0)


def test_affinity_output_counts_the_answer_in_the_memory_wait() -> None:
    policy, plain = make_affinity_output(), POLICIES["affinity"]
    # A 32-block prompt, pools of 40 blocks. Worker 0 caches its first 8 blocks and its requests
    # hold 16: excess 16 + 32 - 8 - 40 = 0 without the output, 32 with 513 output tokens (32
    # blocks more). Worker 1 holds nothing: excess -8 without, 24 with.
    views = [view(0, overlap=8, held=16), view(1)]

    def make(output_tokens: int) -> RoutingInput:
        return inp(views, 16 * 32, cap=40, service=50_000.0, output_tokens=output_tokens)

    assert plain(make(513)) == 0  # the match, no memory wait
    assert policy(make(1)) == 0
    # with the answer: worker 0 waits 8 x 50 s x 32/40, worker 1 8 x 50 s x 24/40; the gap (80 s)
    # is far outside the band (half a 512-token prefill), so the worker that holds less wins
    assert policy(make(513)) == 1


def test_affinity_decode_prices_held_decode_blocks_as_prefill_time() -> None:
    policy = make_affinity_decode(1.0, 0.5)
    # 64 tokens: a full prefill is 5 + 64 x 0.08 (+ context) ~ 10.1 ms, the band half of it.
    # Worker 0 caches 2 of 4 blocks (prefill ~7.6 ms); each block its requests hold costs
    # 16 x 0.08 = 1.28 ms more.
    assert policy(inp([view(0, overlap=2, blocks=2), view(1)])) == 0  # 7.6 + 2.6 within the band: the match
    assert policy(inp([view(0, overlap=2, blocks=100), view(1)])) == 1  # 7.6 + 128 ms
    assert POLICIES["affinity"](inp([view(0, overlap=2, blocks=100), view(1)])) == 0  # affinity ignores them
    assert make_affinity_decode(0.01, 0.5)(inp([view(0, overlap=2, blocks=100), view(1)])) == 0


def test_the_router_hands_policies_the_request_keys_and_output() -> None:
    seen: list[tuple[int, tuple[bytes, ...]]] = []

    def record(i: RoutingInput) -> int:
        seen.append((i.output_tokens, tuple(i.block_keys)))
        return 0

    router = Router(record, block_size=16)
    router.add_worker(0)
    router.route(RouteRequest("r", [KEY, b"x" * 16], 40, output_tokens=9))
    assert seen == [(9, (KEY, b"x" * 16))]


def test_bounded_hash_in_the_router_keeps_a_key_home_until_the_cap() -> None:
    now = [0.0]
    router = Router("bounded_hash", block_size=16, clock=lambda: now[0])
    for w in range(4):
        router.add_worker(w)
    order = _home_order(KEY, [0, 1, 2, 3])
    # first: cap ceil(1.25 x 1 / 4) = 1, home; second: cap ceil(1.25 x 2 / 4) = 1 and the home
    # holds 1 -> the key's next worker
    placed = [router.route(RouteRequest(f"r{i}", [KEY], 16)) for i in range(2)]
    assert placed == [order[0], order[1]]
    router.on_finished("r0")
    router.on_finished("r1")
    assert router.route(RouteRequest("r2", [KEY], 16)) == order[0]  # idle again: home


@pytest.mark.parametrize("kwargs", [{"load_factor": 0.9}, {"key_blocks": 0}])
def test_bounded_hash_rejects_bad_constants(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        make_bounded_hash(**kwargs)  # type: ignore[arg-type]


def test_the_router_models_when_finishing_requests_free_blocks() -> None:
    lat = LatencyModel(
        prefill_base_ms=0.0,
        prefill_ms_per_token=1.0,
        prefill_ms_per_token_per_ctx_token=0.0,
        decode_base_ms=10.0,
        decode_ms_per_token_per_seq=0.0,
    )
    seen: list[list[float]] = []

    def first_worker(inp: RoutingInput) -> int:
        if inp.release_wait is not None:
            seen.append([float(inp.release_wait(np.array([excess]))[0]) for excess in (-1, 3, 5, 9, 40)])
        return 0

    now = [0.0]
    router = Router(first_worker, block_size=16, latency=lat, capacity_blocks=8, clock=lambda: now[0])
    router.add_worker(0)
    keys = [bytes([i]) * 16 for i in range(12)]
    # r1: 4 blocks, prefill 64 ms, then 9 decode steps: modelled to finish at 154 ms.
    router.route(RouteRequest("r1", keys[:4], 64, output_tokens=10))
    # r2: 8 blocks, prefill 128 ms after r1's, then 99 steps: finishes at 64 + 128 + 990 = 1,182 ms.
    router.route(RouteRequest("r2", keys[4:12], 128, output_tokens=100))
    now[0] = 100.0
    router.route(RouteRequest("r3", keys[:1], 16))
    # Per excess: nothing to free; 3 and 4 blocks freed by r1's end (54 ms from now); 5 to
    # 12 blocks by r2's (1,082 ms); more than both hold: the last modelled finish.
    assert seen[-1] == [0.0, 54.0, 1082.0, 1082.0, 1082.0]


def test_affinity_release_waits_for_the_modelled_release_not_a_weighted_guess() -> None:
    # Worker 0 holds 3 of the request's 4 blocks but its pool is full (8 held of 8): one block
    # must be freed first. Worker 1 is idle and holds nothing.
    views = [view(0, overlap=3, active=2, blocks=8, held=8), view(1)]

    def with_release(wait_ms: float) -> RoutingInput:
        return RoutingInput(
            64,
            16,
            views,
            LAT,
            0,
            random.Random(0),
            8,
            1000.0,
            1,
            (),
            lambda excess: np.where(excess > 0, wait_ms, 0.0),
        )

    policy = make_affinity_release()
    assert policy(with_release(1.0)) == 0  # a block frees at once: the held prefix wins
    assert policy(with_release(60_000.0)) == 1  # not for a minute: the idle worker
    # affinity's weighted wait (8 x 1,000 ms x 1 / 8 = 1 s) sends it away whatever the release
    assert POLICIES["affinity"](with_release(1.0)) == 1
