"""``kvcache generate`` on a tiny model: exact hit counts per tenant and both TTFT columns."""

from __future__ import annotations

import pytest

from kvcache.cli import main


def test_generate_reports_hits_per_tenant(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", "tiny", "--tenants", "2", "--sessions", "2", "--turns", "2"]
    argv += ["--system-prompt-tokens", "32"]
    assert main([*argv, "--user-tokens", "16", "--output-tokens", "4", "--num-blocks", "64"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line}
    # turn 0: tenant0 computes the 2 public blocks; tenant1 hits them (32 of 48 tokens).
    # turn 1 (68 tokens): each tenant hits its own 3 full blocks of turn 0 (48 tokens).
    assert rows["tenant0"][1:5] == ["2", "116", "48", "41.4%"]
    assert rows["tenant1"][1:5] == ["2", "116", "80", "69.0%"]
    assert rows["all"][1:5] == ["4", "232", "128", "55.2%"]
    reuse_ms, bare_ms = float(rows["all"][5]), float(rows["all"][6])
    assert reuse_ms > 0 and bare_ms > 0
    assert rows["all"][7].endswith("x")
