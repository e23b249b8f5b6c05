"""Cache-affinity routing over workers, and trace replay over simulated GPU workers.

Embed ``Router`` in a server (route requests, feed worker events back); replay traces with
``replay`` and score policies with ``report``. See docs/router.md.
"""

from kvcache.router.latency import LatencyModel
from kvcache.router.policies import POLICIES, RoutingInput, WorkerView
from kvcache.router.replay import ReplayConfig, ReplayResult, replay
from kvcache.router.router import Router, RouteRequest
from kvcache.router.trace import Trace, TraceRequest, read_trace, write_trace
from kvcache.router.worker import SpillHook, Worker

__all__ = [
    "POLICIES",
    "LatencyModel",
    "ReplayConfig",
    "ReplayResult",
    "RouteRequest",
    "Router",
    "RoutingInput",
    "SpillHook",
    "Trace",
    "TraceRequest",
    "Worker",
    "WorkerView",
    "read_trace",
    "replay",
    "write_trace",
]
