"""What a user sees from the ``kvcache`` command when something is wrong, run as a real process.

Every bad value ends in exit status 2 and a last stderr line ``kvcache COMMAND: error: ...`` naming
the value, never a traceback; bad values are refused before any work starts. Also: ``--version``,
defaults in ``--help``, and no progress bars in a redirected log.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kvcache import __version__, cli
from kvcache.child import python_argv
from kvcache.commands import _argtypes as argtypes


def kvcache(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # "no GPU" even on a GPU machine
    return subprocess.run(
        [*python_argv(), "-m", "kvcache.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], command: str, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kvcache {command}: error: "), last
    for fragment in fragments:
        assert fragment in last, last


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "t.jsonl"
    assert cli.main(["trace", str(path), "--requests", "40", "--seed", "3"]) == 0
    return path


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--workers", "0"], ["--workers", "'0' must be an integer >= 1"]),
        (["--workers", "two"], ["--workers", "'two' is not an integer"]),
        (["--capacity-fraction", "-0.1"], ["--capacity-fraction", "'-0.1' must be a fraction in (0, 1]"]),
        (["--capacity-fraction", "1.5"], ["'1.5' must be a fraction in (0, 1]"]),
        (["--capacity-blocks", "0,274"], ["--capacity-blocks '0,274' must be integers >= 1"]),
        (["--plot", "/nonexistent/x.png"], ["--plot", "directory '/nonexistent' does not exist"]),
        (["--json", "/nonexistent/x.json"], ["--json", "directory '/nonexistent' does not exist"]),
        (["--fail", "99@10", "--workers", "2"], ["cannot fail worker 99"]),
    ],
)
def test_replay_refuses_bad_values(trace: Path, argv: list[str], fragments: list[str]) -> None:
    assert_one_line_error(kvcache("replay", str(trace), "--quiet", *argv), "replay", *fragments)


def test_missing_trace_file(tmp_path: Path) -> None:
    proc = kvcache("replay", str(tmp_path / "nosuch.jsonl"))
    assert_one_line_error(proc, "replay", "nosuch.jsonl")


def test_trace_into_a_missing_directory() -> None:
    proc = kvcache("trace", "/nonexistent/dir/t.jsonl")
    assert_one_line_error(proc, "trace", "'/nonexistent/dir' does not exist")


def test_output_path_that_is_a_directory(tmp_path: Path) -> None:
    assert_one_line_error(kvcache("trace", str(tmp_path)), "trace", "is a directory")


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_serve_refuses_a_port_out_of_range(port: str) -> None:
    assert_one_line_error(kvcache("serve", "--port", port), "serve", "--port")


def test_serve_on_a_taken_port_fails_before_starting_anything() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = kvcache("serve", "--port", str(port))
    assert_one_line_error(proc, "serve", f"cannot listen on 127.0.0.1:{port}", "choose another --port")


def test_generate_on_cuda_without_a_gpu() -> None:
    proc = kvcache("generate", "--device", "cuda", "--sessions", "1", "--turns", "1")
    assert_one_line_error(proc, "generate", "device 'cuda': no CUDA device is available", "use 'cpu'")


def test_unreadable_input_is_one_line_not_a_traceback(tmp_path: Path, trace: Path) -> None:
    # an OSError raised inside a command (here: the latency file is a directory) ends in one line too
    proc = kvcache("replay", str(trace), "--latency", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("kvcache replay: error: ")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvcache {__version__}"


def test_help_shows_defaults() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    replay_help = " ".join(sub.choices["replay"].format_help().split())
    assert "--workers WORKERS (default: 16)" in replay_help
    assert "--policy POLICY" in replay_help and "(default: affinity)" in replay_help
    assert "--seed SEED (default: 0)" in replay_help  # a zero default is still shown
    assert "(default: [])" not in replay_help and "(default: False)" not in replay_help
    for name, command in sub.choices.items():
        for action in command._actions:
            has_default = action.default not in (None, False, [], argparse.SUPPRESS)
            if action.option_strings and has_default and action.help != argparse.SUPPRESS:
                assert "default" in (action.help or ""), f"kvcache {name} {action.option_strings[0]}"


def test_no_progress_bars_in_a_redirected_log(trace: Path) -> None:
    proc = kvcache("replay", str(trace), "--workers", "2", "--policy", "round_robin,affinity")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "round_robin" in proc.stdout and "\r" not in proc.stdout


@pytest.mark.parametrize(
    ("kind", "accepted", "refused"),
    [
        (argtypes.positive_int, {"1": 1, "16": 16}, ["0", "-3", "1.5", "x"]),
        (argtypes.non_negative_int, {"0": 0, "7": 7}, ["-1", "x"]),
        (argtypes.positive_float, {"0.5": 0.5, "inf": float("inf")}, ["0", "-1", "nan", "x"]),
        (argtypes.non_negative_float, {"0": 0.0, "2.5": 2.5}, ["-0.1", "inf", "nan"]),
        (argtypes.fraction, {"1": 1.0, "0.1": 0.1}, ["0", "-0.1", "1.01", "nan"]),
        (argtypes.port, {"0": 0, "8000": 8000, "65535": 65535}, ["-1", "65536", "99999", "http"]),
    ],
)
def test_argument_types(kind: Any, accepted: dict[str, float], refused: list[str]) -> None:
    for text, value in accepted.items():
        assert kind(text) == value
    for text in refused:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(text))):
            kind(text)
