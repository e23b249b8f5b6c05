"""Trace replay speed (simulated requests per wall second) and the Mooncake acceptance run.

Group "replay": the same trace replayed under ``round_robin`` (the baseline: no index walk, no
cost model) and under ``affinity``; the ratio is affinity's routing overhead. Group "policy
all": every policy on the Mooncake trace at 16 workers x 1/16 of 10% of its unique blocks,
the run whose table docs/router.md shows; it checks the bar (affinity >= 95% of the best
baseline's token hit rate, p99 TTFT no worse). The trace is ``../shared/traces/`` or
``$KVCACHE_MOONCAKE_TRACE``; without it a synthetic Mooncake-format trace stands in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kvcache.lab import report
from kvcache.lab.replay import ReplayConfig, prepare, replay
from kvcache.lab.trace import FORMAT_MOONCAKE, Trace, read_trace, to_block_ids
from kvcache.lab.workloads import SynthConfig, synthesize
from kvcache.router.policies import BASELINES, COMPARED

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"


@pytest.fixture(scope="module")
def trace() -> Trace:
    path = Path(os.environ.get("KVCACHE_MOONCAKE_TRACE", DEFAULT_TRACE))
    if path.is_file():
        return read_trace(path)
    reqs = synthesize(SynthConfig(num_requests=2000, session_rate_per_s=2.0, seed=0))
    return Trace(to_block_ids(reqs, 512), FORMAT_MOONCAKE, 512)


def capacity(trace: Trace, workers: int = 16) -> int:
    return max(1, int(0.1 * trace.unique_blocks() / workers))


@pytest.mark.parametrize("policy", ["round_robin", "affinity"])
def test_replay(benchmark: Any, trace: Trace, policy: str) -> None:
    benchmark.group = "replay 16 workers, simulated requests"
    if policy == "round_robin":
        benchmark.name = benchmark.name.replace("test_replay", "test_replay_baseline")
    prompts = prepare(trace, 512)
    config = ReplayConfig(16, capacity(trace), policy)
    benchmark.extra_info["requests"] = len(trace.requests)
    result = benchmark.pedantic(lambda: replay(trace, config, prompts=prompts), rounds=3, iterations=1)
    assert result.num_lost == 0
    rate = len(trace.requests) / benchmark.stats.stats.median
    benchmark.extra_info["simulated_requests_per_s"] = rate
    print(f"\n{policy}: {rate:.0f} simulated requests per wall second (load {os.getloadavg()[0]:.2f})")


@pytest.mark.benchmark(group="policy all, 16 workers x 10% of unique blocks")
def test_policy_all(benchmark: Any, trace: Trace) -> None:
    cap = capacity(trace)
    benchmark.extra_info["requests"] = len(trace.requests) * len(COMPARED)

    def run_all() -> dict[str, dict[str, Any]]:
        prompts = prepare(trace, 512)
        return {p: report.metrics(replay(trace, ReplayConfig(16, cap, p), prompts=prompts)) for p in COMPARED}

    rows = benchmark.pedantic(run_all, rounds=1, iterations=1)
    print("\n" + report.table(list(rows.values())))
    best_hit = max(rows[p]["token_hit_rate"] for p in BASELINES)
    best_p99 = min(rows[p]["p99_ttft_ms"] for p in BASELINES)
    ours = rows["affinity"]
    benchmark.extra_info["hit_ratio_vs_best_baseline"] = ours["token_hit_rate"] / best_hit
    benchmark.extra_info["p99_ratio_vs_best_baseline"] = ours["p99_ttft_ms"] / best_p99
    assert ours["token_hit_rate"] >= 0.95 * best_hit
    assert ours["p99_ttft_ms"] <= best_p99
