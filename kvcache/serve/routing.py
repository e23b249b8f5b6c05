"""A routing policy for served workers that run one request at a time: lowest estimated TTFT.

The router's ``affinity`` policy prices a worker's queue as the *prefill* work routed there and
assumes continuous batching (``LatencyModel.max_num_seqs`` sequences decode together), so a
request waits only for prefills. A served worker here runs one request at a time, prefill and
every decode step, so a request waits for the whole service time of everything ahead of it;
a cache hit saves only its own prefill. ``affinity`` then keeps sessions on the worker holding
their prefix while that worker's queue grows and the other worker idles: it loses to
``round_robin`` on TTFT as soon as decode time exceeds the prefill saved.

``make_ttft_policy(estimate)`` scores a worker by

    active_requests x service_ms + new_tokens x prefill_ms_per_token

(``new_tokens``: prompt tokens the worker lacks, from the router's prefix index) with both
rates measured online from the workers' own reports (``ServiceEstimate``, exponentially
weighted), so the cache wins exactly when the prefill it saves exceeds the extra queueing.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcache.router.policies import Policy, RoutingInput, WorkerView, argmin

_ALPHA = 0.2  # weight of the newest sample in the moving averages


@dataclass(slots=True)
class ServiceEstimate:
    """Moving averages of a worker's time per request and prefill time per computed token."""

    service_ms: float = 50.0
    prefill_ms_per_token: float = 0.05

    def observe(self, service_ms: float, prefill_ms: float, computed_tokens: int) -> None:
        self.service_ms += _ALPHA * (service_ms - self.service_ms)
        if computed_tokens > 0:
            per_token = prefill_ms / computed_tokens
            self.prefill_ms_per_token += _ALPHA * (per_token - self.prefill_ms_per_token)


def make_ttft_policy(estimate: ServiceEstimate) -> Policy:
    def ttft(inp: RoutingInput) -> int:
        def cost(v: WorkerView) -> float:
            return v.active_requests * estimate.service_ms + inp.new_tokens(v) * estimate.prefill_ms_per_token

        return argmin(inp, cost)

    return ttft
