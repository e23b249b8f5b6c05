"""``make bench`` relies on pytest collecting ``benches/bench_*.py``; ``make test`` must not run them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kvcache.child import python_argv

ROOT = Path(__file__).resolve().parents[1]


def _collect(*paths: str) -> list[str]:
    proc = subprocess.run(
        [*python_argv(), "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_benches_folder_collects_every_bench_file() -> None:
    ids = _collect("benches/bench_hashing.py", "benches/bench_manager.py", "benches")
    files = {i.split("::")[0] for i in ids}
    expected = {f"benches/{p.name}" for p in (ROOT / "benches").glob("bench_*.py")}
    assert files == expected
    assert "benches/bench_hashing.py::test_hash_kvcache_xxh3_chain" in ids


def test_default_run_collects_no_benchmark() -> None:
    ids = _collect()  # testpaths, as a bare ``pytest`` and ``make test`` run
    assert "tests/test_bench_collect.py::test_default_run_collects_no_benchmark" in ids
    assert not any(i.startswith("benches/") for i in ids)
