"""``kvcache.lab.tables``: exact text of both renderers, the cell rules they share, and a bad spec."""

from __future__ import annotations

import pytest

from kvcache.errors import ConfigError
from kvcache.lab import tables
from kvcache.lab.tables import Column

ROWS = [
    {"policy": "affinity", "hit": 0.253, "p99_ms": 7853.4, "lost": 0},
    {"policy": "round_robin", "hit": 0.02, "p99_ms": 36794.0, "lost": 12},
]
COLUMNS = (
    Column("policy", "policy", align="<"),
    Column("tok hit", "hit", ".1%"),
    Column("p99 ms", "p99_ms", ",.0f"),
    Column("lost", "lost"),
)


def test_plain_sizes_each_column_to_its_widest_cell_or_title() -> None:
    assert tables.plain(COLUMNS, ROWS).splitlines() == [
        "policy       tok hit  p99 ms  lost",
        "affinity       25.3%   7,853     0",
        "round_robin     2.0%  36,794    12",
    ]


def test_plain_gap_no_header_and_no_trailing_spaces() -> None:
    columns = (Column("", 0, align="<"), Column("", 1, align="<"))
    text = tables.plain(columns, [("Requests sent", "3"), ("Failed requests", "")], gap=1, header=False)
    assert text.splitlines() == ["Requests sent   3", "Failed requests"]
    assert tables.plain(COLUMNS, []) == "policy  tok hit  p99 ms  lost"


def test_markdown_cells_are_compact_and_the_alignment_row_follows_the_columns() -> None:
    assert tables.markdown(COLUMNS, ROWS).splitlines() == [
        "| policy | tok hit | p99 ms | lost |",
        "|---|---:|---:|---:|",
        "| affinity | 25.3% | 7,853 | 0 |",
        "| round_robin | 2.0% | 36,794 | 12 |",
    ]


def test_a_callable_reads_the_whole_row_and_rows_keep_their_order() -> None:
    ratio = Column("p99 / hit", lambda r: f"{r['p99_ms'] / 1000:.1f} s / {r['hit']:.0%}", align="<")
    assert tables.markdown([COLUMNS[0], ratio], reversed(ROWS)).splitlines()[2:] == [
        "| round_robin | 36.8 s / 2% |",
        "| affinity | 7.9 s / 25% |",
    ]


def test_retitled_keeps_values_formats_and_alignment() -> None:
    long = tables.retitled(COLUMNS, ("policy", "token hit", "p99 TTFT ms", "lost requests"))
    assert [c.title for c in long] == ["policy", "token hit", "p99 TTFT ms", "lost requests"]
    assert tables.markdown(long, ROWS).splitlines()[2] == "| affinity | 25.3% | 7,853 | 0 |"
    with pytest.raises(ConfigError, match="3 titles for 4 columns"):
        tables.retitled(COLUMNS, ("a", "b", "c"))


def test_an_unknown_alignment_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="column 'hit' has align '\\^'"):
        Column("hit", "hit", align="^")  # type: ignore[arg-type]
