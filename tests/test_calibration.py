"""Calibration: the fit recovers known coefficients; the JSON has exactly the LatencyModel keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcache import hf
from kvcache.calibration import LatencyFit, Sample, fit, measure, write_latency_json
from kvcache.engine import Engine, EngineConfig
from kvcache.router.latency import LatencyModel

KEYS = [
    "prefill_base_ms",
    "prefill_ms_per_token",
    "prefill_ms_per_token_per_ctx_token",
    "decode_base_ms",
    "decode_ms_per_token_per_seq",
    "max_num_seqs",
    "max_batched_tokens",
]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_fit_recovers_exact_linear_costs() -> None:
    samples = [
        Sample("prefill", n, c, 2.0 + 0.5 * n + 0.001 * n * (c + n / 2))
        for n in (10, 50, 90)
        for c in (0, 100, 400)
    ]
    samples += [Sample("decode", b, 64, 3.0 + 0.25 * b) for b in (1, 2, 8)]
    got = fit(samples, max_num_seqs=8, max_batched_tokens=2048)
    assert got.prefill_base_ms == pytest.approx(2.0, abs=1e-9)
    assert got.prefill_ms_per_token == pytest.approx(0.5, abs=1e-9)
    assert got.prefill_ms_per_token_per_ctx_token == pytest.approx(0.001, abs=1e-12)
    assert got.decode_base_ms == pytest.approx(3.0, abs=1e-9)
    assert got.decode_ms_per_token_per_seq == pytest.approx(0.25, abs=1e-9)
    assert (got.max_num_seqs, got.max_batched_tokens) == (8, 2048)


def test_json_has_exactly_the_latency_model_fields(tmp_path: Path) -> None:
    path = tmp_path / "latency.json"
    write_latency_json(LatencyFit(1.0, 0.1, 0.001, 2.0, 0.2, 16, 4096), path)
    data = json.loads(path.read_text())
    assert list(data) == KEYS
    assert data["max_num_seqs"] == 16 and data["prefill_ms_per_token"] == 0.1
    model = LatencyModel.from_json(path)  # what ``kvcache replay --latency`` reads
    assert (model.prefill_ms_per_token_per_ctx_token, model.decode_base_ms, model.max_batched_tokens) == (
        0.001,
        2.0,
        4096,
    )


def test_measure_times_every_grid_point_with_the_right_cached_context() -> None:
    engine = Engine(hf.load_model("tiny-qwen2", device="cpu"), EngineConfig(num_blocks=128))
    samples = measure(engine, new_tokens=(8, 24), contexts=(0, 32), batches=(1, 3), decode_ctx=16, repeats=2)
    assert [(s.kind, s.num_new, s.ctx) for s in samples] == [
        ("prefill", 8, 0),
        ("prefill", 24, 0),
        ("prefill", 8, 32),
        ("prefill", 24, 32),
        ("decode", 1, 16),
        ("decode", 3, 16),
    ]
    assert all(s.ms > 0 for s in samples)
    assert engine.manager.num_running == 0
