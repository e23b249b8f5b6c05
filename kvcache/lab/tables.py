"""Tables as data: a column spec and two renderers, fixed-width text for a terminal and Markdown for
the docs.

A ``Column`` says what one column shows: its title, how to get a row's value (a key or index into
the row, or a function of the row), the format spec that turns the value into the cell's text, and
the alignment (``"<"`` for text, ``">"`` for numbers); ``retitled`` gives the same columns other
titles (a terminal table's short ones, the docs' long ones). ``plain`` sizes each column to its widest
cell or title and puts ``gap`` spaces between columns; ``markdown`` writes ``| a | b |`` rows with an
alignment row (``|---|---:|``) and compact cells (no padding), so a table regenerated from the same
figures is byte-identical. Rows are taken as given: the caller orders them.

Not here: which columns a report shows (each report, command and bench owns its columns), the text
around a table (captions, notes, totals in prose), escaping of ``|`` inside Markdown cells (no cell
holds one), plots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kvcache.errors import ConfigError

Align = Literal["<", ">"]
ALIGNS = ("<", ">")


@dataclass(frozen=True, slots=True)
class Column:
    """One column: ``title``; ``value``, a key (or index) into each row, or a function of the row;
    ``spec``, the format spec applied to the value (``".1%"``, ``",.0f"``; ``""`` is ``str``);
    ``align``, ``"<"`` (left, for text) or ``">"`` (right, for numbers)."""

    title: str
    value: str | int | Callable[[Any], Any]
    spec: str = ""
    align: Align = ">"

    def __post_init__(self) -> None:
        if self.align not in ALIGNS:
            raise ConfigError(
                f"column {self.title!r} has align {self.align!r}; use '<' (text) or '>' (numbers)"
            )

    def cell(self, row: Any) -> str:
        """The text of this column's cell in ``row``."""
        value = self.value(row) if callable(self.value) else row[self.value]
        return format(value, self.spec)


def retitled(columns: Sequence[Column], titles: Sequence[str]) -> tuple[Column, ...]:
    """The same columns under other titles, one per column: a report whose terminal table
    abbreviates what its Markdown spells out keeps one spec of values and formats."""
    if len(titles) != len(columns):
        raise ConfigError(f"{len(titles)} titles for {len(columns)} columns; give one title per column")
    return tuple(dataclasses.replace(c, title=t) for c, t in zip(columns, titles, strict=True))


def _cells(columns: Sequence[Column], rows: Iterable[Any]) -> list[list[str]]:
    return [[c.cell(r) for c in columns] for r in rows]


def plain(columns: Sequence[Column], rows: Iterable[Any], *, gap: int = 2, header: bool = True) -> str:
    """Fixed-width text: the titles (unless ``header`` is false), then one line per row; each
    column as wide as its widest cell or title, ``gap`` spaces apart; no trailing spaces."""
    body = _cells(columns, rows)
    lines = ([[c.title for c in columns]] if header else []) + body
    widths = [max((len(line[i]) for line in lines), default=0) for i in range(len(columns))]
    sep = " " * gap
    return "\n".join(
        sep.join(
            text.ljust(width) if c.align == "<" else text.rjust(width)
            for c, text, width in zip(columns, line, widths, strict=True)
        ).rstrip()
        for line in lines
    )


def markdown(columns: Sequence[Column], rows: Iterable[Any]) -> str:
    """Markdown: a header row, the alignment row (``---`` left, ``---:`` right), one row per row;
    cells unpadded."""
    lines = [
        "| " + " | ".join(c.title for c in columns) + " |",
        "|" + "".join("---|" if c.align == "<" else "---:|" for c in columns),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in _cells(columns, rows)]
    return "\n".join(lines)
