"""``kvcache trace`` and ``kvcache replay`` end to end on a small generated trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcache import cli


def test_trace_then_replay_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    assert cli.main(["trace", str(trace), "--requests", "80", "--session-rate", "2"]) == 0
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    argv = [
        "replay",
        str(trace),
        "--workers",
        "4",
        "--capacity-blocks",
        "20,40",
        "--policy",
        "all",
        "--json",
        str(out_json),
        "--plot",
        str(out_png),
        "--fail",
        "1@10",
        "--quiet",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "20 blocks per worker" in out and "40 blocks per worker" in out and "upper bounds" in out
    payload = json.loads(out_json.read_text())
    rows = payload["results"]
    assert [r["policy"] for r in rows[:7]] == [
        "round_robin",
        "random",
        "least_loaded",
        "lpm",
        "dynamo",
        "sglang",
        "affinity",
    ]
    assert len(rows) == 14 and all(r["lost"] == 0 and r["completed"] == 80 for r in rows)
    for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "request_throughput", "token_hit_rate"):
        assert key in rows[0]
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_single_policy_breakdowns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    assert (
        cli.main(["trace", str(trace), "--requests", "30", "--format", "tokens", "--workload", "chat"]) == 0
    )
    argv = [
        "replay",
        str(trace),
        "--workers",
        "2",
        "--capacity-blocks",
        "64",
        "--policy",
        "lpm,affinity",
        "--mode",
        "approx",
        "--per-worker",
        "--markdown",
        "--no-bounds",
        "--quiet",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "blocks of 16 tokens; 2 workers, mode approx" in out
    assert "| policy | token hit |" in out and "| affinity |" in out
    assert "lpm: worker  completed" in out and "upper bounds" not in out


def test_replay_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    assert cli.main(["trace", str(trace), "--requests", "5", "--format", "tokens"]) == 0
    assert cli.main(["replay", str(trace), "--policy", "nope", "--quiet"]) == 2
    assert "--policy 'nope' is unknown" in capsys.readouterr().err
    assert cli.main(["replay", str(trace), "--fail", "x", "--quiet"]) == 2
    assert "must be WORKER@SECONDS" in capsys.readouterr().err
