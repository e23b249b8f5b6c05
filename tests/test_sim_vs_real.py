"""The pieces of ``benches/sim_vs_real.py`` on a tiny trace, without a server: the trace, the
simulated side (arrivals at the measured send times, the served workers' concurrency), the
statistics, the table and the CDF figure."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kvcache.costs import LatencyModel
from kvcache.lab import serve_bench as bench
from kvcache.serve import launch

ROOT = Path(__file__).resolve().parents[1]
LATENCY = LatencyModel(
    prefill_base_ms=2.0,
    prefill_ms_per_token=0.01,
    prefill_ms_per_token_per_ctx_token=0.0,
    decode_base_ms=4.0,
    decode_ms_per_token_per_seq=0.5,
)


@pytest.fixture(scope="module")
def svr() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_sim_vs_real", ROOT / "benches" / "sim_vs_real.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def served(trace: list, sent_s: list[float]) -> list[bench.Result]:  # type: ignore[type-arg]
    """What bench-serve would return: every request answered in full, no hits, 50 ms TTFT."""
    return [
        bench.Result(
            ok=True, prompt_tokens=r.num_tokens, output_tokens=r.output_tokens, ttft_s=0.05, sent_s=s
        )
        for r, s in zip(trace, sent_s, strict=True)
    ]


def test_the_trace_is_multi_turn_chat_over_one_system_prompt(svr: ModuleType) -> None:
    trace = svr.make_trace(12, vocab_size=256, system_tokens=64, user_tokens=16, output_tokens=4)
    assert len(trace) == 12
    assert all(r.tokens is not None and max(r.tokens) < 256 and r.tenant == "default" for r in trace)
    assert len({tuple(r.tokens[:64]) for r in trace}) == 1  # one shared system prompt
    sessions: dict[str, list[int]] = {}
    for r in trace:
        sessions.setdefault(r.session, []).append(r.num_tokens)
    assert any(len(lengths) > 1 for lengths in sessions.values())
    assert all(lengths == sorted(lengths) for lengths in sessions.values())  # each turn re-sends the history


def test_the_simulated_worker_serves_one_request_at_a_time(svr: ModuleType) -> None:
    trace = svr.make_trace(2, vocab_size=256, system_tokens=64, user_tokens=16, output_tokens=4)
    result = svr.model(trace, served(trace, [0.0, 0.001]), "round_robin", 1, 64, LATENCY, 1)
    lat = launch.worker_latency(LATENCY, 1)
    first, second = sorted(result.jobs, key=lambda j: j.arrival_ms)
    assert first.first_token_ms - first.arrival_ms == pytest.approx(lat.prefill_ms(first.request.num_tokens))
    # The second waits for the whole first request: its prefill and its decode steps.
    first_done = first.first_token_ms + (first.request.output_tokens - 1) * lat.decode_step_ms(1)
    assert second.start_ms == pytest.approx(first_done)
    cached = second.cached_tokens
    assert cached >= 64 // 16 * 16  # the shared system prompt's blocks
    own = lat.prefill_ms(second.request.num_tokens - cached, cached)
    assert second.first_token_ms == pytest.approx(first_done + own)


def test_table_ranking_and_figure(svr: ModuleType, tmp_path: Path) -> None:
    trace = svr.make_trace(16, vocab_size=256, system_tokens=64, user_tokens=16, output_tokens=4)
    sent = [0.05 * i for i in range(len(trace))]
    rows = {}
    for policy in ("round_robin", "affinity"):
        results = served(trace, sent)
        sim = svr.model(trace, results, policy, 2, 64, LATENCY, 64)
        rows[policy] = {"measured": svr.measured_stats(results, 2.0), "modelled": svr.modelled_stats(sim)}
    measured = rows["affinity"]["measured"]
    assert (measured["token_hit_rate"], measured["p50_ttft_ms"], measured["failed"]) == (0.0, 50.0, 0)
    assert measured["output_tok_s"] == pytest.approx(sum(r.output_tokens for r in trace) / 2.0)
    # Sessions stay on the worker holding their history under affinity, not under round_robin.
    assert rows["affinity"]["modelled"]["token_hit_rate"] > rows["round_robin"]["modelled"]["token_hit_rate"]
    text = svr.table(rows)
    assert text.splitlines()[0].startswith("policy") and "ranking by mean TTFT, modelled:" in text
    svr.plot(rows, str(tmp_path / "cdf.png"), "test")
    assert (tmp_path / "cdf.png").stat().st_size > 0


def test_medians_over_runs_pool_the_ttft_samples(svr: ModuleType) -> None:
    def row(hit: float, p50: float, ttft: list[float]) -> dict[str, dict[str, Any]]:
        side = {"token_hit_rate": hit, "p50_ttft_ms": p50, "ttft_ms": ttft}
        return {"measured": side, "modelled": dict(side)}

    runs = [
        {"affinity": row(0.8, 10.0, [1.0])},
        {"affinity": row(0.9, 30.0, [2.0])},
        {"affinity": row(0.7, 20.0, [3.0, 4.0])},
    ]
    got = svr.median_rows(runs)["affinity"]["measured"]
    assert got == {"token_hit_rate": 0.8, "p50_ttft_ms": 20.0, "ttft_ms": [1.0, 2.0, 3.0, 4.0]}
