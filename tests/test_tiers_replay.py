"""Simulated tiers inside the router's replay: loads instead of recomputes, and ``--tiers``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcache import cli
from kvcache.costs import LatencyModel
from kvcache.lab import report
from kvcache.lab.replay import ReplayConfig, prepare, replay
from kvcache.lab.sim_tiers import SimTiers, TierSizes
from kvcache.lab.trace import FORMAT_MOONCAKE, Trace, to_block_ids
from kvcache.lab.workloads import SynthConfig, synthesize


def small_trace() -> Trace:
    reqs = synthesize(SynthConfig(workload="mix", num_requests=120, seed=0, session_rate_per_s=2.0))
    return Trace(to_block_ids(reqs, 512), FORMAT_MOONCAKE, 512)


def test_tiers_turn_recomputation_into_loads_on_the_same_gpu_capacity() -> None:
    trace = small_trace()
    prompts = prepare(trace, 512)
    config = ReplayConfig(4, 20, "round_robin")
    base = report.metrics(replay(trace, config, prompts=prompts))
    sim = SimTiers(4, TierSizes(g2=40, g3=160, icms=400), 512, prefill=LatencyModel())
    tiered_result = replay(trace, config, prompts=prompts, spill=sim)
    tiered = report.metrics(tiered_result)
    loaded = sum(j.loaded_tokens for j in tiered_result.jobs)
    assert loaded == tiered["loaded_tokens"] > 0
    assert sum(s.blocks_hit for s in sim.stats.values()) >= loaded // 512
    assert tiered["token_hit_rate"] > base["token_hit_rate"]
    assert tiered["prefill_tokens_computed"] == base["total_input_tokens"] - round(
        tiered["token_hit_rate"] * base["total_input_tokens"]
    )
    assert sim.stats["icms"].cross_worker_hits > 0  # round robin: prefixes land on other workers
    assert tiered["lost"] == 0 and tiered["completed"] == base["completed"]


def test_replay_command_compares_with_g1_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    assert cli.main(["trace", str(trace), "--requests", "60", "--session-rate", "2"]) == 0
    out_json = tmp_path / "r.json"
    argv = ["replay", str(trace), "--workers", "2", "--capacity-blocks", "20", "--policy", "round_robin"]
    argv += [
        "--tiers",
        "g2=2x,g3=200,icms=100",
        "--json",
        str(out_json),
        "--markdown",
        "--quiet",
        "--no-bounds",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "spill tiers g2=2x,g3=200,icms=100" in out and "p99 change" in out
    assert "| policy | G1-only token hit | with tiers |" in out
    rows = json.loads(out_json.read_text())["results"]
    assert [r["policy"] for r in rows] == ["round_robin", "round_robin+tiers"]
    tiers = rows[1]["tiers"]
    assert tiers["sizes"] == {"g2": 40, "g3": 200, "icms": 100}
    by_tier = sum(tiers[n]["token_hit_rate"] for n in ("g2", "g3", "icms"))
    assert tiers["device_token_hit_rate"] + by_tier == pytest.approx(rows[1]["token_hit_rate"])
    assert cli.main([*argv[:-3], "--tiers", "g5=1"]) == 2
