"""Calibration: the fit recovers known coefficients; the JSON has exactly the LatencyModel keys."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kvcache.costs import LatencyModel
from kvcache.engine import Engine, EngineConfig, StepRecord
from kvcache.lab.calibration import fit, measure, predict_ms
from kvcache.model import hf

KEYS = [
    "prefill_base_ms",
    "prefill_ms_per_token",
    "prefill_ms_per_token_per_ctx_token",
    "decode_base_ms",
    "decode_ms_per_token_per_seq",
    "max_num_seqs",
    "max_num_batched_tokens",
    "request_overhead_ms",  # 0 from calibrate: it measures the engine alone
]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def step(prefill: int, decode: int, work: float, ms: float) -> StepRecord:
    return StepRecord(prefill, decode, prefill + decode, work, ms / 1000, ms / 1000)


def test_fit_recovers_exact_linear_costs_from_mixed_steps() -> None:
    records = []
    for n in (10, 50, 90):
        for c in (0, 100, 400):
            for d in (0, 3):  # prefill alone, and chunked prefill next to 3 decoding sequences
                work = n * (c + n / 2)
                records.append(step(n, d, work, 2.0 + 0.5 * n + 0.001 * work + 0.25 * d))
    records += [step(0, b, 0.0, 3.0 + 0.25 * b) for b in (1, 2, 8)]
    got = fit(records, max_num_seqs=8, max_num_batched_tokens=2048)
    assert got.prefill_base_ms == pytest.approx(2.0, abs=1e-9)
    assert got.prefill_ms_per_token == pytest.approx(0.5, abs=1e-9)
    assert got.prefill_ms_per_token_per_ctx_token == pytest.approx(0.001, abs=1e-12)
    assert got.decode_base_ms == pytest.approx(3.0, abs=1e-9)
    assert got.decode_ms_per_token_per_seq == pytest.approx(0.25, abs=1e-9)
    assert (got.max_num_seqs, got.max_num_batched_tokens) == (8, 2048)
    # the fitted model prices a chunked-prefill step exactly as the router's LatencyModel does
    model = LatencyModel(**dataclasses.asdict(got))
    mixed = step(50, 3, 50 * (100 + 25), 0.0)
    assert predict_ms(got, mixed) == pytest.approx(model.prefill_ms(50, 100, num_running=3), abs=1e-9)
    assert predict_ms(got, step(0, 8, 0.0, 0.0)) == pytest.approx(model.decode_step_ms(8), abs=1e-9)


def test_json_has_exactly_the_latency_model_fields(tmp_path: Path) -> None:
    path = tmp_path / "latency.json"
    LatencyModel(1.0, 0.1, 0.001, 2.0, 0.2, 16, 4096).to_json(path)
    data = json.loads(path.read_text())
    assert list(data) == KEYS
    assert data["max_num_seqs"] == 16 and data["prefill_ms_per_token"] == 0.1
    model = LatencyModel.from_json(path)  # what ``kvcache replay --latency`` reads
    assert (model.prefill_ms_per_token_per_ctx_token, model.decode_base_ms, model.max_num_batched_tokens) == (
        0.001,
        2.0,
        4096,
    )


def test_measure_records_real_prefill_and_batched_decode_steps() -> None:
    engine = Engine(hf.load_model("tiny-qwen2", device="cpu"), EngineConfig(num_blocks=128))
    records = measure(engine, new_tokens=(8, 24), contexts=(0, 32), batches=(1, 3), decode_ctx=16, repeats=2)
    prefill = [(r.num_prefill_tokens, r.num_context_tokens) for r in records if not r.num_decode_seqs]
    # every grid point twice: new tokens after the cached context, one request per step
    assert prefill[:8] == [(8, 8), (8, 8), (24, 24), (24, 24), (8, 40), (8, 40), (24, 56), (24, 56)]
    decode_batches = {r.num_decode_seqs for r in records if r.num_decode_seqs and not r.num_prefill_tokens}
    assert decode_batches == {1, 3}
    assert all(r.seconds >= r.model_seconds > 0 for r in records)
    assert engine.manager.num_running == 0


def test_the_tier_cost_rule_reads_the_fitted_latency_model(tmp_path: Path) -> None:
    from kvcache.tiers import TransferModel, best_load_prefix

    path = tmp_path / "latency.json"
    LatencyModel(1.0, 0.1, 0.001, 2.0, 0.2, 16, 4096).to_json(path)
    latency = LatencyModel.from_json(path)
    # Recomputing 16 tokens after 32 cached: 16 x 0.1 + 16 x (32 + 8) x 0.001 = 2.24 ms.
    assert latency.compute_ms(16, 32) == pytest.approx(2.24)
    # A 2.0 ms load of that block saves 0.24 ms, so the rule loads it; a 2.5 ms load it declines.
    for load_ms, expected in ((2.0, 1), (2.5, 0)):
        link = TransferModel(bandwidth_bytes_per_s=1e12, base_latency_ms=load_ms)
        assert best_load_prefix([link], 0, 16, 32, latency)[0] == expected


def test_the_old_chunk_budget_flag_names_its_new_name(capsys: pytest.CaptureFixture[str]) -> None:
    from kvcache.cli import main

    with pytest.raises(SystemExit, match="2"):
        main(["calibrate", "--max-batched-tokens", "2048"])
    assert "--max-batched-tokens was renamed --max-num-batched-tokens" in capsys.readouterr().err
