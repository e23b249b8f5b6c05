"""The router's per-worker columns stay what its loads say, through every change of state.

Policies read the router's belief as columns the router updates where a worker's load changes
(route, finish, report, prefill end by time, removal). Here a policy records what it was shown
and the test recomputes each worker's view from ``router.loads`` the direct way, after random
routes, finishes, reports, removals and re-additions on a small slot limit (so full workers
take the slot-wait path).
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache import BlockStored
from kvcache.costs import LatencyModel
from kvcache.router import Router, RouteRequest
from kvcache.router.policies import RoutingInput, WorkerView

KEYS = [bytes([i]) * 16 for i in range(6)]


def expected_views(router: Router, keys: list[bytes], now: float) -> list[WorkerView]:
    overlap = router.index.overlaps(keys, now)
    slots = router.latency.max_num_seqs
    return [
        WorkerView(
            w,
            overlap.get(w, 0),
            len(load.active),
            load.active_blocks,
            sum(tokens for end, tokens in load.pending if end > now),  # ends in routing order
            load.start_ms(now, slots) - now,
            len(load.held),
            load.reported,
        )
        for w, load in router.loads.items()
    ]


ops = st.lists(
    st.tuples(
        st.sampled_from(["route", "finish", "report", "remove", "add", "events", "tick"]), st.integers(0, 99)
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_policies_see_exactly_the_router_loads(script: list[tuple[str, int]]) -> None:
    now = [0.0]
    shown: list[list[WorkerView]] = []
    rng = random.Random(0)

    def record(inp: RoutingInput) -> int:
        shown.append(list(inp.workers))
        return rng.choice(inp.workers).worker_id  # type: ignore[no-any-return]

    router = Router(record, block_size=16, latency=LatencyModel(max_num_seqs=2), clock=lambda: now[0])
    for w in range(3):
        router.add_worker(w)
    added, routed = 3, []
    for step, (op, n) in enumerate(script):
        workers = list(router.loads)
        keys = KEYS[: 1 + n % 6]
        if op == "route":
            routed.append(f"r{step}")
            router.route(RouteRequest(f"r{step}", keys, 16 * len(keys) - n % 5, output_tokens=1 + n % 40))
        elif op == "finish" and routed:
            rid = routed.pop(n % len(routed))
            if rid in router.where:  # not on a removed worker
                router.on_finished(rid)
        elif op == "report":
            router.observe_load(workers[n % len(workers)], n)
        elif op == "remove" and len(workers) > 1:
            router.remove_worker(workers[n % len(workers)])
        elif op == "add":
            # a new id, or one removed before (its late state must not come back)
            free = sorted(set(range(added)) - set(workers))
            router.add_worker(free[0] if free and n % 2 else added)
            added += 1 if not (free and n % 2) else 0
        elif op == "events":
            router.on_events(workers[n % len(workers)], [BlockStored(k, b"", 0, "s") for k in KEYS[: n % 7]])
        else:
            now[0] += n * 7.5
        want = expected_views(router, keys, now[0])
        shown.clear()
        router.route(RouteRequest(f"probe{step}", keys, 16 * len(keys)))
        router.on_finished(f"probe{step}")
        assert shown == [want]
