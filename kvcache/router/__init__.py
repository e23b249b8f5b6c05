"""Cache-affinity routing over workers: the router, its policies and its prefix index.

Embed ``Router`` in a server (route requests, feed worker events back). Not here: the step-cost
model the policies price with (``kvcache.costs``), trace replay over simulated workers
(``kvcache.lab``). See docs/router.md.
"""

from kvcache.router.policies import POLICIES, RoutingInput, WorkerId, WorkerView
from kvcache.router.router import Router, RouteRequest

__all__ = [
    "POLICIES",
    "RouteRequest",
    "Router",
    "RoutingInput",
    "WorkerId",
    "WorkerView",
]
