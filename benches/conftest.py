"""Benchmark plumbing: fixed thread counts, the machine's load, and ratios within each group.

Every group holds a baseline (a test whose name contains ``baseline``) and ours; the summary
prints each one's median, its ratio to the baseline, and a rate from ``extra_info``
(``tokens``, ``requests`` or ``bytes`` per call), then the same as the Markdown table the README's
performance section shows.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from kvcache.lab import tables
from kvcache.lab.tables import Column

NUM_THREADS = 2


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(NUM_THREADS)


def _rate(bench: Any) -> str:
    for unit in ("tokens", "requests", "bytes"):
        if unit in bench.extra_info:
            per_s = bench.extra_info[unit] / bench.stats.median
            return f"{per_s / 1e9:.2f} GB/s" if unit == "bytes" else f"{per_s / 1e6:.3g} M {unit}/s"
    return ""


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _groups(session: Any) -> dict[str, list[Any]]:
    """Group name -> its benchmarks, groups in the order they ran, the baseline first."""
    groups: dict[str, list[Any]] = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    return {g: sorted(b, key=lambda x: "baseline" not in x.name) for g, b in groups.items()}


def _base_cell(base: Any) -> str:
    return f"{_ms(base.stats.median)} ms, {_rate(base)}".rstrip(", ") if base else ""


def _ours_cell(ours: list[Any]) -> str:
    text = " / ".join(_ms(b.stats.median) for b in ours) + " ms"
    return text + (f", {_rate(ours[0])}" if len(ours) == 1 and _rate(ours[0]) else "")


SUMMARY_COLUMNS = (  # one row per group: (name, baseline or None, ours)
    Column("benchmark", 0, align="<"),
    Column(
        "baseline",
        lambda g: f"{_ms(g[1].stats.median)} ms, {_rate(g[1])}".rstrip(", ") if g[1] else "",
        align="<",
    ),
    Column("kvcache", lambda g: _ours_cell(g[2]), align="<"),
    Column(
        "ratio",
        lambda g: " / ".join(f"{g[1].stats.median / b.stats.median:.2f}x" for b in g[2]) if g[1] else "",
        align="<",
    ),
)


def markdown_table(session: Any) -> list[str]:
    """The README's performance table: per group, the baseline's median and rate, ours, the ratio.

    A group with several of ours (allocate+free at 50% and 100% cached) joins them with " / ".
    """
    rows = []
    for group, benches in _groups(session).items():
        base = benches[0] if "baseline" in benches[0].name else None
        rows.append((group, base, [b for b in benches if b is not base]))
    return tables.markdown(SUMMARY_COLUMNS, rows).splitlines()


@pytest.hookimpl(trylast=True)
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
    for group, benches in _groups(session).items():
        base = benches[0] if "baseline" in benches[0].name else None
        write(f"  [{group}]")
        for b in benches:
            ratio = (
                f"  x{base.stats.median / b.stats.median:.2f} vs baseline" if base and b is not base else ""
            )
            write(f"    {b.name:<60} median {b.stats.median * 1e3:9.3f} ms  {_rate(b):>18}{ratio}")
    write("")
    for line in markdown_table(session):
        write(line)
