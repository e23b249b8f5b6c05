"""Replays: deterministic, placing as the policy says, no collapse on a shared first block,
failures re-routed with nothing lost, both index modes."""

from __future__ import annotations

from collections import Counter

import pytest

from kvcache import ConfigError
from kvcache.lab import report
from kvcache.lab.replay import ReplayConfig, prepare, replay
from kvcache.lab.trace import FORMAT_MOONCAKE, FORMAT_TOKENS, Trace, to_block_ids
from kvcache.lab.workloads import SynthConfig, synthesize


def mooncake(
    workload: str = "mix", n: int = 120, seed: int = 0, rate: float = 2.0, system: int = 1024
) -> Trace:
    reqs = synthesize(
        SynthConfig(
            workload=workload, num_requests=n, seed=seed, session_rate_per_s=rate, system_prompt_tokens=system
        )
    )
    return Trace(to_block_ids(reqs, 512), FORMAT_MOONCAKE, 512)


def test_deterministic_for_a_seed() -> None:
    trace = mooncake()
    a = replay(trace, ReplayConfig(4, 40, "random", seed=7))
    b = replay(trace, ReplayConfig(4, 40, "random", seed=7))
    c = replay(trace, ReplayConfig(4, 40, "random", seed=8))
    place = [j.worker_id for j in a.jobs]
    assert place == [j.worker_id for j in b.jobs]
    assert [j.first_token_ms for j in a.jobs] == [j.first_token_ms for j in b.jobs]
    assert place != [j.worker_id for j in c.jobs]


def test_round_robin_places_in_turn_and_everything_finishes() -> None:
    trace = mooncake(n=40)
    result = replay(trace, ReplayConfig(3, 60, "round_robin"))
    assert [j.worker_id for j in result.jobs] == [i % 3 for i in range(40)]
    assert result.num_lost == 0
    for j in result.jobs:
        assert j.arrival_ms <= j.start_ms <= j.first_token_ms <= j.finish_ms
        assert j.cached_tokens + j.prefill_tokens == j.request.num_tokens


def test_prefix_aware_policies_hit_more() -> None:
    trace = mooncake(n=200)
    prompts = prepare(trace, 512)
    rates = {
        p: report.metrics(replay(trace, ReplayConfig(4, 40, p), prompts=prompts))["token_hit_rate"]
        for p in ("round_robin", "lpm", "affinity")
    }
    assert rates["lpm"] > rates["round_robin"] + 0.05
    assert rates["affinity"] > rates["round_robin"] + 0.05
    bounds = report.upper_bounds(trace, prompts, 512, 160)
    assert (
        bounds["infinite_cache_token_hit_rate"]
        >= bounds["shared_cache_token_hit_rate"]
        >= rates["lpm"] - 0.05
    )


def test_shared_first_block_does_not_collapse_affinity() -> None:
    trace = mooncake("shared_prefix", n=200, rate=5.0, system=512)
    assert len({r.block_ids[0] for r in trace.requests if r.block_ids}) == 1
    spread = {}
    for policy in ("lpm", "affinity"):
        result = replay(trace, ReplayConfig(4, 40, policy))
        counts = Counter(j.worker_id for j in result.jobs)
        spread[policy] = max(counts.values()) / (len(trace.requests) / 4)
    assert spread["lpm"] > 3.0  # pure prefix match sends (almost) everything to one worker
    assert spread["affinity"] < 1.5


def test_failure_reroutes_and_loses_nothing() -> None:
    trace = mooncake(n=150)
    fail_at_s = trace.requests[75].timestamp_ms / 1000.0
    result = replay(trace, ReplayConfig(4, 40, "affinity", failures=((2, fail_at_s),)))
    m = report.metrics(result)
    assert m["lost"] == 0 and m["completed"] == 150
    assert result.num_rerouted > 0
    after = [j for j in result.jobs if j.start_ms > fail_at_s * 1000.0]
    assert after and all(j.worker_id != 2 for j in after)


@pytest.mark.parametrize("mode", ["precise", "approx"])
def test_modes_and_event_delay(mode: str) -> None:
    trace = mooncake(n=150)
    fresh = report.metrics(replay(trace, ReplayConfig(4, 40, "lpm", mode=mode)))
    assert fresh["token_hit_rate"] > 0.2
    late = report.metrics(replay(trace, ReplayConfig(4, 40, "lpm", mode=mode, event_delay_ms=60_000.0)))
    if mode == "precise":  # the router learns a minute late: fewer hits
        assert late["token_hit_rate"] < fresh["token_hit_rate"]
    else:  # approximate mode ignores events
        assert late["token_hit_rate"] == fresh["token_hit_rate"]


def test_token_traces_replay_with_scopes() -> None:
    reqs = synthesize(SynthConfig(workload="chat", num_requests=60, num_tenants=2))
    trace = Trace(reqs, FORMAT_TOKENS, None)
    m = report.metrics(replay(trace, ReplayConfig(2, 256, "affinity")))
    assert m["completed"] == 60 and m["token_hit_rate"] > 0.3
    assert sum(w["completed"] for w in m["per_worker"]) == 60


def test_bad_configs() -> None:
    with pytest.raises(ConfigError, match="policy='best' is unknown"):
        ReplayConfig(2, 10, "best")
    with pytest.raises(ConfigError, match=r"cannot fail worker 5: workers are 0..1"):
        ReplayConfig(2, 10, failures=((5, 1.0),))
    with pytest.raises(ConfigError, match="keep at least one alive"):
        ReplayConfig(1, 10, failures=((0, 1.0),))
    with pytest.raises(ConfigError, match="block_size=16 differs"):
        replay(mooncake(n=5), ReplayConfig(1, 10), block_size=16)


@pytest.mark.parametrize("kind", ["block ids", "tokens"])
def test_runs_of_decode_steps_taken_at_once_equal_the_steps_one_by_one(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulated workers' fast path (a steady run of decode steps in one call, cut by
    arrivals) against the reference (every step scheduled), with a failure re-routing mid-run."""
    from kvcache.engine.scheduler import Scheduler

    if kind == "tokens":
        trace = Trace(synthesize(SynthConfig(workload="mix", num_requests=80, seed=3)), FORMAT_TOKENS, None)
    else:
        trace = mooncake(n=120, rate=4.0)
    config = ReplayConfig(3, 30 if kind == "block ids" else 60, "affinity", failures=((1, 10.0),))
    fast = replay(trace, config)
    monkeypatch.setattr(Scheduler, "is_steady", lambda self, out: False)
    slow = replay(trace, config)
    assert fast.num_lost == slow.num_lost == 0 and fast.num_rerouted == slow.num_rerouted > 0
    for f, s in zip(fast.jobs, slow.jobs, strict=True):
        assert (f.worker_id, f.attempts, f.cached_tokens, f.loaded_tokens, f.prefill_tokens) == (
            s.worker_id,
            s.attempts,
            s.cached_tokens,
            s.loaded_tokens,
            s.prefill_tokens,
        )
        times = (f.start_ms, f.first_token_ms, f.finish_ms)
        assert times == pytest.approx((s.start_ms, s.first_token_ms, s.finish_ms), rel=1e-9, abs=1e-6)
