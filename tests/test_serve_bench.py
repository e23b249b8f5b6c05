"""bench-serve's trace loading and its vllm-named summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcache.errors import TraceError
from kvcache.serve.bench import Result, load_trace, summarize, table


def test_token_and_mooncake_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    tokens = [{"timestamp": 0, "text": "hi", "output_length": 3, "tenant": "acme"},
              {"timestamp": 1, "tokens": [1, 2, 3], "output_length": 16, "tenant": "bob"}]
    mooncake = [{"timestamp": 0, "input_length": 20, "output_length": 2, "hash_ids": [7, 8]},
                {"timestamp": 5, "input_length": 12, "output_length": 1, "hash_ids": [7]}]  # fmt: skip
    path.write_text("\n".join(json.dumps(x) for x in tokens) + "\n\n")
    trace = load_trace(str(path), block_tokens=16, vocab_size=256)
    assert [(r.output_tokens, r.tenant) for r in trace] == [(3, "acme"), (16, "bob")]
    assert trace[0].prompt == list(b"hi") and trace[1].prompt == [1, 2, 3]
    path.write_text("\n".join(json.dumps(x) for x in mooncake) + "\n")
    trace = load_trace(str(path), block_tokens=16, vocab_size=256)
    assert [(r.output_tokens, r.tenant) for r in trace] == [(2, None), (1, None)]
    a, b = trace[0].prompt, trace[1].prompt
    assert isinstance(a, list) and isinstance(b, list)
    assert len(a) == 20 and len(b) == 12 and a[:12] == b  # equal hash ids, equal blocks
    assert all(1 <= t < 256 for t in a)


def test_synthetic_trace_is_the_multi_tenant_chat_workload() -> None:
    trace = load_trace("synthetic:tenants=2,sessions=1,turns=2,system=32,user=8,output=4")
    assert [r.tenant for r in trace] == ["tenant0", "tenant1", "tenant0", "tenant1"]
    assert [len(r.prompt) for r in trace] == [40, 40, 52, 52]
    assert trace[0].prompt[:32] == trace[1].prompt[:32]  # the shared system prompt


@pytest.mark.parametrize(
    ("text", "needle"),
    [("not json", ":1: not valid JSON"), ('{"timestamp": 0, "tenant": "a", "text": "", "output_length": 1}',
     "'text' is empty"), ('{"timestamp": 0, "tenant": "a", "text": "x", "output_length": 0}',
     "'output_length'=0"), ('{"timestamp": 0, "input_length": 99, "output_length": 1, "hash_ids": [1]}',
     "input_length=99")],
)  # fmt: skip
def test_bad_traces_name_the_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(TraceError) as info:
        load_trace(str(path), block_tokens=16)
    assert needle in str(info.value)
    with pytest.raises(TraceError, match="synthetic trace option 'users=3'"):
        load_trace("synthetic:users=3")


def test_summary_uses_vllm_key_names() -> None:
    results = [
        Result(True, 100, 4, 64, 0.010, 0.040, [0.01, 0.01, 0.01]),
        Result(True, 100, 4, 0, 0.030, 0.060, [0.01, 0.01, 0.01]),
        Result(False, error="HTTP 429"),
    ]
    s = summarize(results, 2.0, rate=5.0, max_concurrency=4)
    assert (s["completed"], s["failed"], s["total_input_tokens"], s["total_output_tokens"]) == (2, 1, 200, 8)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 4.0
    assert s["mean_ttft_ms"] == pytest.approx(20.0) and s["median_ttft_ms"] == pytest.approx(20.0)
    assert s["mean_tpot_ms"] == pytest.approx(10.0) and s["mean_itl_ms"] == pytest.approx(10.0)
    assert s["cache_hit_rate"] == 0.32 and s["errors"] == ["HTTP 429"]
    assert "Mean TTFT (ms)" in table(s)
