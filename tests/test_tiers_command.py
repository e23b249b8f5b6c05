"""``kvcache tiers`` end to end on a small layout: spills, loads back bit-exact, shares across workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcache import cli


@pytest.mark.parametrize("redis", [False, True])
def test_tiers_command(tmp_path: Path, capsys: pytest.CaptureFixture[str], redis: bool) -> None:
    argv = ["tiers", "--dir", str(tmp_path), "--prompts", "4", "--prompt-blocks", "4", "--g1-blocks", "8"]
    argv += ["--g2-blocks", "4", "--g3-blocks", "64", "--layers", "2", "--head-dim", "8"]
    assert cli.main(argv + (["--redis"] if redis else [])) == 0
    out = capsys.readouterr().out
    assert "every loaded block verified bit-exact" in out
    rows = {line[:24].strip(): line[24:].split() for line in out.splitlines() if line.startswith("worker ")}
    assert rows["worker 0, first pass"][:2] == ["0", "0"]  # device hits, tier loads
    assert rows["worker 0, second pass"][1] == "16"  # all 16 blocks came back from the tiers
    assert rows["worker 1, same prompts"][1] == "16"
    icms_rows = [line.split() for line in out.splitlines() if line.strip().startswith("ICMS")]
    assert int(icms_rows[1][-2]) == 16  # worker 1's loads were all cross-worker hits
    assert list((tmp_path / "worker0").iterdir())  # G3 files under the chosen directory
