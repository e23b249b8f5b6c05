"""The serial-worker TTFT policy: queueing priced at whole requests, prefill at measured rates."""

from __future__ import annotations

import random

import pytest

from kvcache.router.latency import LatencyModel
from kvcache.router.policies import POLICIES, RoutingInput, WorkerView
from kvcache.serve.routing import ServiceEstimate, make_ttft_policy


def view(worker_id: int, overlap: int, active: int) -> WorkerView:
    return WorkerView(worker_id, overlap, active, active * 10, 0, 0.0)


def routed(policy_name: str, estimate: ServiceEstimate, views: list[WorkerView]) -> int:
    inp = RoutingInput(512, 16, views, LatencyModel(), 0, random.Random(0))
    policy = make_ttft_policy(estimate) if policy_name == "ttft" else POLICIES[policy_name]
    return policy(inp)


def test_estimates_are_moving_averages() -> None:
    est = ServiceEstimate(service_ms=100.0, prefill_ms_per_token=0.1)
    est.observe(200.0, 30.0, 100)
    assert est.service_ms == pytest.approx(120.0)
    assert est.prefill_ms_per_token == pytest.approx(0.1 + 0.2 * (0.3 - 0.1))
    est.observe(120.0, 5.0, 0)  # a full hit computes nothing: per-token rate unchanged
    assert est.prefill_ms_per_token == pytest.approx(0.14)


def test_a_queue_of_whole_requests_outweighs_a_prefix_hit() -> None:
    est = ServiceEstimate(service_ms=80.0, prefill_ms_per_token=0.05)
    holder, idle = view(0, overlap=30, active=3), view(1, overlap=0, active=0)
    # 3 x 80 ms queued vs 512 x 0.05 = 25.6 ms of prefill saved: the idle worker wins ...
    assert routed("ttft", est, [holder, idle]) == 1
    # ... where the batching cost model (prefill-only queue) keeps the request on the holder.
    assert routed("affinity", est, [holder, idle]) == 0
    # With equal queues the prefix decides.
    assert routed("ttft", est, [view(0, 30, 1), view(1, 0, 1)]) == 0
    # A long prefill saved can be worth waiting for one request.
    slow = ServiceEstimate(service_ms=80.0, prefill_ms_per_token=1.0)
    assert routed("ttft", slow, [view(0, 30, 1), view(1, 0, 0)]) == 0
