"""Benchmark plumbing: fixed thread counts, the machine's load, and ratios within each group.

Every group holds a baseline (a test whose name contains ``baseline``) and ours; the summary
prints each one's median, its ratio to the baseline, and a rate from ``extra_info``
(``tokens`` or ``requests`` per call).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

NUM_THREADS = 2


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(NUM_THREADS)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    write = terminalreporter.write_line
    load = os.getloadavg()
    write("")
    write(
        f"kvcache benchmark summary (torch threads {NUM_THREADS}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} cpus)"
    )
    groups: dict[str, list[Any]] = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    for group, benches in sorted(groups.items()):
        base = next((b for b in benches if "baseline" in b.name), None)
        write(f"  [{group}]")
        for b in benches:
            median = b.stats.median
            rate = ""
            for unit in ("tokens", "requests", "bytes"):
                if unit in b.extra_info:
                    per_s = b.extra_info[unit] / median
                    rate = f"{per_s / 1e9:.2f} GB/s" if unit == "bytes" else f"{per_s / 1e6:.2f} M{unit}/s"
            ratio = (
                f"  x{base.stats.median / median:.2f} vs baseline"
                if base is not None and b is not base
                else ""
            )
            write(f"    {b.name:<60} median {median * 1e3:9.3f} ms  {rate:>16}{ratio}")
