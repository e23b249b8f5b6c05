"""The laboratory: traces, synthetic workloads, replay over simulated workers and tiers, the policy
matrix, reports and the tables they print (``tables``), calibration and serve benchmarks.

Replay traces with ``replay`` and score policies with ``report``; nothing below this package imports
it. See docs/router.md.
"""

from kvcache.lab.replay import ReplayConfig, ReplayResult, replay
from kvcache.lab.sim_worker import SimWorker, SpillHook
from kvcache.lab.trace import Trace, TraceRequest, read_trace, write_trace

__all__ = [
    "ReplayConfig",
    "ReplayResult",
    "SimWorker",
    "SpillHook",
    "Trace",
    "TraceRequest",
    "read_trace",
    "replay",
    "write_trace",
]
