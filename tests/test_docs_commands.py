"""Every ``kvcache ...`` command in a fenced block of README.md and docs/*.md still parses, and runs.

Each command line (``\\`` continuations joined, a trailing ``# comment`` dropped) is one test case,
named by file and line. Every one must parse with today's ``kvcache`` parser, so a renamed or
removed option fails here. Then it runs in a temporary folder, in this process, with the trace
placeholders (``TRACE``, ``../shared/traces/...``) replaced by a small generated trace, unless an
entry of ``SKIP`` matches it; each entry says why that command cannot run in a test. A new
command in the docs is therefore run by default: if it cannot be (a server, a GPU, minutes of
work), add a ``SKIP`` entry with the reason. An entry that matches no command fails too, so the
list cannot rot.
"""

from __future__ import annotations

import re
import shlex
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvcache import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 120  # a command that runs longer than this belongs in SKIP

# regex searched in the command (without the leading "kvcache ") -> why it is not run here
SKIP = {
    r"^serve\b": "starts a server that runs until stopped (tests/test_serve_e2e.py runs one)",
    r"^worker\b": "joins a deployment through Redis and serves until stopped",
    r"^bench-serve\b": "loads a running server",
    r"^matrix\b": "45 shape x load x policy replays, about a minute (tests/test_router_command.py runs a "
    "small matrix)",
    r"^route\b": "a proxy that runs until stopped (tests/test_router_proxy.py runs one)",
    r"--model (PATH|/)": "needs a model checkpoint on disk; the tests use random-weight models",
    r"--device cuda": "needs a GPU",
    r"^generate$": "chat sessions on a tiny model, ~30 s on two cores (tests/test_generate_command.py "
    "runs a smaller one)",
    r"^calibrate\b": "times prefill and decode over a grid, about a minute on two cores "
    "(tests/test_calibration.py fits a smaller one)",
}

# what stands for a trace in the docs -> replaced by a small generated Mooncake trace
TRACE_PLACEHOLDERS = re.compile(r"^(TRACE|(\.\./)?shared/traces/\S+\.jsonl)$")


COMMAND_LINE = re.compile(r"^(\$\s+)?(\S*/)?kvcache(\s|$)")


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/router.md:10"
    argv: tuple[str, ...]  # after "kvcache"

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


def doc_commands() -> list[DocCommand]:
    found = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        fenced = False
        i = 0
        while i < len(lines):
            line, start = lines[i].strip(), i
            if line.startswith("```"):
                fenced = not fenced
            elif fenced and COMMAND_LINE.match(line):  # not example output, which need not be shell
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i].strip()
                words = shlex.split(line, comments=True)
                if words and words[0] == "$":
                    words = words[1:]
                if words and (words[0] == "kvcache" or words[0].endswith("/kvcache")):
                    found.append(DocCommand(f"{path.relative_to(ROOT)}:{start + 1}", tuple(words[1:])))
            i += 1
    return found


COMMANDS = doc_commands()


def skip_reason(command: DocCommand) -> str | None:
    for pattern, reason in SKIP.items():
        if re.search(pattern, command.text):
            return reason
    return None


def parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str | None:
    """argparse's error line for ``kvcache argv``, or None when it parses."""
    try:
        cli.build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code != 0:
            return capsys.readouterr().err.strip().splitlines()[-1]
    return None


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("docs") / "trace.jsonl"
    assert cli.main(["trace", str(path), "--requests", "60", "--seed", "2"]) == 0
    return str(path)


@pytest.fixture
def time_limit() -> Iterator[None]:
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"ran over {TIMEOUT_S} s: make it faster or add a SKIP entry with the reason")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_the_docs_have_commands() -> None:
    where = {c.where.split(":")[0] for c in COMMANDS}
    assert {"README.md", "docs/router.md", "docs/tiers.md"} <= where
    assert len(COMMANDS) >= 20


def test_every_skip_entry_is_used() -> None:
    unused = [p for p in SKIP if not any(re.search(p, c.text) for c in COMMANDS)]
    assert not unused, f"SKIP entries that match no documented command (remove them): {unused}"


def test_a_command_that_no_longer_parses_is_caught(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_error(["replay", "t.jsonl", "--workers", "4"], capsys) is None
    error = parse_error(["replay", "t.jsonl", "--capacity-fraktion", "0.1"], capsys)
    assert error is not None and "unrecognized arguments: --capacity-fraktion" in error


def test_docs_use_relative_paths() -> None:
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        assert "/work/" not in text, f"{path.name}: an absolute machine path; use ../shared/... instead"


def test_documented_latency_models_load(tmp_path: Path) -> None:
    """A fenced JSON block holding a latency model is one ``kvcache replay --latency`` accepts."""
    from kvcache.costs import LatencyModel

    blocks = [
        block
        for path in DOCS
        for block in re.findall(r"```json\n(.*?)```", path.read_text(encoding="utf-8"), re.S)
        if "prefill_base_ms" in block
    ]
    assert blocks, "docs/router.md shows lat70.json"
    for i, block in enumerate(blocks):
        (tmp_path / f"{i}.json").write_text(block)
        assert isinstance(LatencyModel.from_json(tmp_path / f"{i}.json"), LatencyModel)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command(
    command: DocCommand,
    small_trace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    time_limit: None,
) -> None:
    argv = [small_trace if TRACE_PLACEHOLDERS.match(word) else word for word in command.argv]
    (tmp_path / "docs").mkdir()  # commands that write docs/*.png, as run from the repository root
    monkeypatch.chdir(tmp_path)
    error = parse_error(argv, capsys)
    if error is not None:
        pytest.fail(f"{command.where}: 'kvcache {command.text}' no longer parses: {error}")
    reason = skip_reason(command)
    if reason is not None:
        pytest.skip(f"parses; not run: {reason}")
    assert cli.main(argv) == 0, f"{command.where}: 'kvcache {command.text}' failed"
