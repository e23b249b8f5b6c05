"""``benches/serve_batching.py`` on a server that cannot start: its log folder is created, and the
run stops at once with the server's error instead of waiting for workers that never come."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kvcache.child import python_argv

ROOT = Path(__file__).resolve().parents[1]


def test_a_server_that_dies_stops_the_bench_with_its_error(tmp_path: Path) -> None:
    logs = tmp_path / "not" / "yet"
    argv = python_argv(
        str(ROOT / "benches" / "serve_batching.py"),
        "--model",
        "nosuch-model",
        "--workers",
        "1",
        "--rounds",
        "1",
        "--logs",
        str(logs),
        "--out",
        str(tmp_path / "out.json"),
    )
    # Far below the 300 s the bench gives workers to join: the dead server is noticed at once.
    done = subprocess.run(argv, capture_output=True, text=True, timeout=200)
    assert done.returncode == 1, done.stderr
    assert "kvcache serve exited with code 2 before its workers joined" in done.stderr
    assert "model 'nosuch-model' has no tokenizer files" in done.stderr  # the end of the server's log
    assert "Traceback" not in done.stderr
    names = sorted(p.name for p in logs.iterdir())
    assert names == ["serve-batching-batched.log", "serve-batching-serial.log"]
    assert not (tmp_path / "out.json").exists()
