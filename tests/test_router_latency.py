"""The latency model: exact formula values, limits, and its JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvcache import ConfigError
from kvcache.costs import STEP_TERMS, LatencyModel, step_terms


def test_prefill_and_decode_formula() -> None:
    m = LatencyModel(
        prefill_base_ms=2.0,
        prefill_ms_per_token=0.5,
        prefill_ms_per_token_per_ctx_token=0.01,
        decode_base_ms=4.0,
        decode_ms_per_token_per_seq=1.0,
        max_num_seqs=8,
        max_num_batched_tokens=10,
    )
    # 2 steps x (2 + 1 x 3 running) + 20 x 0.5 + 20 x (30 + 10) x 0.01
    assert m.prefill_ms(20, 30, 3) == pytest.approx(10 + 10 + 8)
    assert m.prefill_ms(0, 100) == 0.0
    assert m.decode_step_ms(5) == 9.0
    assert m.decode_step_ms(0) == 5.0


def test_prefill_and_compute_price_arrays_elementwise_bit_for_bit() -> None:
    # The router prices every worker at once; each element must be exactly the scalar figure,
    # counts <= 0 included (they cost 0).
    m = LatencyModel(prefill_ms_per_token=0.07, prefill_ms_per_token_per_ctx_token=3.3e-6)
    new = np.array([-5, 0, 1, 511, 8192, 8193, 40_000])
    cached = np.array([7, 0, 100_000, 3, 0, 12_345, 99])
    running = np.array([2, 0, 127, 5, 64, 1, 0])
    prefill = m.prefill_ms(new, cached, running)
    compute = m.compute_ms(new, cached)
    triples = list(zip(new.tolist(), cached.tolist(), running.tolist(), strict=True))
    expected_prefill = [m.prefill_ms(n, c, r) for n, c, r in triples]
    expected_compute = [m.compute_ms(n, c) for n, c, _ in triples]
    assert prefill.tolist() == expected_prefill
    assert compute.tolist() == expected_compute
    assert expected_prefill[:2] == expected_compute[:2] == [0.0, 0.0]
    # broadcast: one cached count and one running count for every worker
    assert m.prefill_ms(new, 10, 3).tolist() == [m.prefill_ms(n, 10, 3) for n in new.tolist()]


@pytest.mark.parametrize("shape", [(0, 0.0, 7), (300, 4.5e4, 0), (2048, 3.25e6, 12), (1, 0.5, 1)])
def test_a_step_costs_the_sum_of_its_terms_exactly(shape: tuple[int, float, int]) -> None:
    m = LatencyModel(decode_base_ms=7, prefill_ms_per_token=0.0831, prefill_ms_per_token_per_ctx_token=1.7e-6)
    total = 0.0
    for name, term in zip(STEP_TERMS, step_terms(*shape), strict=True):
        total += getattr(m, name) * term
    assert m.step_ms(*shape) == total  # the same float, not an approximation
    assert m.step_ms(0, 0.0, 7) == 7 + 0.15 * 7


def test_json_round_trip_and_errors(tmp_path: Path) -> None:
    m = LatencyModel(prefill_ms_per_token=0.1, max_num_seqs=32)
    m.to_json(tmp_path / "lat.json")
    assert LatencyModel.from_json(tmp_path / "lat.json") == m
    data = json.loads((tmp_path / "lat.json").read_text())
    del data["decode_base_ms"]
    data["gpu"] = "h100"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"unknown keys \['gpu'\], missing keys \['decode_base_ms'\]"):
        LatencyModel.from_json(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="cannot read a latency model"):
        LatencyModel.from_json(tmp_path / "none.json")
    with pytest.raises(ConfigError, match=r"max_num_seqs=0 must be an integer >= 1"):
        LatencyModel(max_num_seqs=0)
    with pytest.raises(ConfigError, match=r"prefill_ms_per_token=-1 must be >= 0"):
        LatencyModel(prefill_ms_per_token=-1)


def test_request_overhead_is_optional_in_json(tmp_path: Path) -> None:
    m = LatencyModel(request_overhead_ms=6.5)
    m.to_json(tmp_path / "lat.json")
    assert LatencyModel.from_json(tmp_path / "lat.json") == m
    data = json.loads((tmp_path / "lat.json").read_text())
    del data["request_overhead_ms"]  # a file written before the field existed
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert LatencyModel.from_json(tmp_path / "old.json").request_overhead_ms == 0.0
    with pytest.raises(ConfigError, match=r"request_overhead_ms=-1 must be >= 0"):
        LatencyModel(request_overhead_ms=-1)


def test_a_file_with_the_old_chunk_budget_key_names_the_rename(tmp_path: Path) -> None:
    m = LatencyModel(max_num_batched_tokens=2048)
    m.to_json(tmp_path / "lat.json")
    data = json.loads((tmp_path / "lat.json").read_text())
    data["max_batched_tokens"] = data.pop("max_num_batched_tokens")
    (tmp_path / "old.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="max_batched_tokens was renamed max_num_batched_tokens"):
        LatencyModel.from_json(tmp_path / "old.json")
