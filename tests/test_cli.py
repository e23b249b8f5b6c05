"""The command line: every command module is found and documented; errors exit 2 with a message."""

from __future__ import annotations

import pytest

from kvcache import cli


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    names = cli.commands()
    assert "demo" in names
    assert cli.build_parser().format_help().count("\n") > len(names)
    for name in names:
        with pytest.raises(SystemExit) as exited:
            cli.main([name, "--help"])
        assert exited.value.code == 0
        assert f"usage: kvcache {name}" in capsys.readouterr().out


def test_demo_runs_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--tenants", "2", "--sessions", "2", "--turns", "2", "--parts", "manager"]) == 0
    assert "hit" in capsys.readouterr().out.lower()
