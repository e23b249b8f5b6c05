"""``kvcache trace`` and ``kvcache replay`` end to end on a small generated trace."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kvcache import cli
from kvcache.costs import LatencyModel


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
    assert [r["policy"] for r in rows[:8]] == [
        "round_robin",
        "random",
        "least_loaded",
        "lpm",
        "dynamo",
        "sglang",
        "lpm_balanced",
        "affinity",
    ]
    assert len(rows) == 16 and all(r["lost"] == 0 and r["completed"] == 80 for r in rows)
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


def test_a_fault_outside_the_trace_is_warned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    times = [0, 1500, 4000]  # requests arrive from 0 s to 4 s
    trace.write_text(
        "".join(
            json.dumps({"timestamp": t, "input_length": 1024, "output_length": 4, "hash_ids": [i, i + 10]})
            + "\n"
            for i, t in enumerate(times)
        )
    )
    argv = ["replay", str(trace), "--workers", "3", "--policy", "lpm", "--no-bounds", "--quiet"]
    assert cli.main([*argv, "--fail", "1@2"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert cli.main([*argv, "--fail", "1@300", "--fail", "0@2.5"]) == 0
    err = capsys.readouterr().err
    assert err == (
        "kvcache replay: warning: --fail 1@300 lies outside the trace, whose requests arrive "
        "from 0.0 s to 4.0 s: worker 1 fails after the last request arrived; pick a time in that "
        "span\n"
    )


def test_shape_trace_and_matrix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "rag.jsonl"
    argv = ["trace", str(trace), "--workload", "rag", "--requests", "50", "--load", "0.5", "--workers", "2"]
    assert cli.main(argv) == 0
    assert len(trace.read_text().splitlines()) == 50
    assert cli.main(["trace", str(trace), "--workload", "rag", "--format", "tokens"]) == 2
    out_json, out_png = tmp_path / "m.json", tmp_path / "m.png"
    argv = ["matrix", "--shapes", "rag", "--workers", "2", "--fractions", "0.1"]
    argv += ["--policy", "lpm_balanced,affinity"]
    assert cli.main([*argv, "--jobs", "1", "--json", str(out_json), "--plot", str(out_png)]) == 0
    payload = json.loads(out_json.read_text())
    assert [c["shape"] for c in payload["cells"]] == ["rag"]
    assert {"pareto", "hit_bar", "p99_bar", "ok"} <= set(payload["cells"][0])
    assert [r["policy"] for r in payload["results"]] == ["lpm_balanced", "affinity"]
    assert "affinity meets all three checks in" in capsys.readouterr().out
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert cli.main([*argv[:-1], "nope"]) == 2


def test_matrix_scales_and_replays_its_cells_on_a_given_latency_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fast = dataclasses.replace(LatencyModel(), prefill_base_ms=1.0, prefill_ms_per_token=0.02)
    path = tmp_path / "fast.json"
    fast.to_json(path)
    argv = ["matrix", "--shapes", "rag", "--workers", "2", "--fractions", "0.1", "--policy", "affinity"]
    argv += ["--jobs", "1"]
    runs = {}
    for name, extra in (("built-in", []), ("fast", ["--latency", str(path)])):
        out = tmp_path / f"{name}.json"
        assert cli.main([*argv, *extra, "--json", str(out)]) == 0
        runs[name] = json.loads(out.read_text())
    assert runs["built-in"]["config"]["latency"] == dataclasses.asdict(LatencyModel())
    assert runs["fast"]["config"]["latency"] == dataclasses.asdict(fast)
    # the same requests at the same offered load on a 4x faster prefill: arrivals closer, and
    # every first token sooner
    builtin, quick = runs["built-in"]["results"][0], runs["fast"]["results"][0]
    assert builtin["num_requests"] == quick["num_requests"]
    assert quick["median_ttft_ms"] < builtin["median_ttft_ms"] / 2
    # affinity alone has no baseline to set its bars: no verdicts, said so (was a ValueError)
    assert "no verdicts: the checks judge affinity against the baselines" in capsys.readouterr().out
    assert all("ok" not in cell for cell in runs["fast"]["cells"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"prefill_base_ms": 1.0}')
    assert cli.main([*argv, "--latency", str(bad)]) == 2
    assert f"kvcache matrix: error: {bad}: " in capsys.readouterr().err
