"""Serving's routing: ``affinity`` priced by the workers' latency model, including their
concurrency, so a worker serving one request at a time charges the whole service time of each
request ahead (prefill and every decode step) against the prefill a prefix hit saves."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvcache.costs import LatencyModel
from kvcache.engine import EngineConfig
from kvcache.errors import RequestError
from kvcache.router import Router, RouteRequest
from kvcache.serve import launch

# 5 ms per step + 0.05 ms per prompt token; 10 ms per decode step whatever the batch.
LATENCY = LatencyModel(
    prefill_base_ms=5.0,
    prefill_ms_per_token=0.05,
    prefill_ms_per_token_per_ctx_token=0.0,
    decode_base_ms=10.0,
    decode_ms_per_token_per_seq=0.0,
)
PREFIX = [bytes([i]) * 8 for i in range(32)]  # a 512-token prompt's 32 block keys


def second_request_goes_to_the_holder(max_num_seqs: int, first_output_tokens: int) -> bool:
    """Route a 512-token prompt, then (at the same instant) the same prompt plus 32 tokens: does
    the second follow the first onto the worker that will hold its prefix?"""
    latency = dataclasses.replace(LATENCY, max_num_seqs=max_num_seqs)
    router = Router("affinity", "approx", 16, latency=latency, clock=lambda: 0.0)
    for w in (0, 1):
        router.add_worker(w)
    holder = router.route(RouteRequest("a", PREFIX, 512, output_tokens=first_output_tokens))
    nxt = router.route(RouteRequest("b", [*PREFIX, b"x" * 8, b"y" * 8], 544, output_tokens=16))
    return nxt == holder


def test_one_request_at_a_time_charges_the_decode_ahead() -> None:
    # Holder: waits for the first request's prefill (5 + 25.6 ms) and its 99 decode steps (990 ms),
    # then prefills 32 tokens (6.6 ms); the idle worker prefills all 544 tokens (32.2 ms).
    assert not second_request_goes_to_the_holder(max_num_seqs=1, first_output_tokens=100)
    # A first request with one output token ends with its prefill: 30.6 + 6.6 = 37.2 ms is within
    # the locality slack (32.2 + 0.5 x 32.2 ms), so the longest prefix wins.
    assert second_request_goes_to_the_holder(max_num_seqs=1, first_output_tokens=1)
    # A batching worker decodes the first request beside the second: only the prefill queue counts.
    assert second_request_goes_to_the_holder(max_num_seqs=128, first_output_tokens=100)


def test_a_finished_request_frees_its_slot() -> None:
    latency = dataclasses.replace(LATENCY, max_num_seqs=1)
    router = Router("affinity", "approx", 16, latency=latency, clock=lambda: 0.0)
    for w in (0, 1):
        router.add_worker(w)
    holder = router.route(RouteRequest("a", PREFIX, 512, output_tokens=100))
    router.on_finished("a")
    assert router.route(RouteRequest("b", [*PREFIX, b"x" * 8], 528, output_tokens=100)) == holder
    with pytest.raises(RequestError, match="output_tokens=0 must be an integer >= 1"):
        router.route(RouteRequest("c", PREFIX, 512, output_tokens=0))


def test_the_front_prices_workers_with_their_concurrency(tmp_path: Path) -> None:
    path = tmp_path / "latency.json"
    LATENCY.to_json(path)  # as `kvcache calibrate` writes it (max_num_seqs=128 here)
    priced = launch.worker_latency(LatencyModel.from_json(path), 8)
    assert priced.max_num_seqs == 8  # the workers' --max-num-seqs, not the file's 128
    # and the chunk budget their engines run, not the file's 8192
    assert (LATENCY.max_num_batched_tokens, priced.max_num_batched_tokens) == (
        8192,
        EngineConfig().max_num_batched_tokens,
    )
    assert (priced.prefill_ms_per_token, priced.decode_base_ms) == (0.05, 10.0)
    assert launch.worker_latency(None, 64).prefill_ms_per_token == LatencyModel().prefill_ms_per_token
