"""Markdown and JSON for every report ldm-scene writes (probe runs, classifier curves, the toy world).

:func:`markdown_table` is the one writer of a Markdown table: every README, REPORT and sweep table
goes through it, so tables look alike and a cell is never typed by hand.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

__all__ = ["markdown_table", "table_row"]


def table_row(cells: Iterable[Any]) -> str:
    """One Markdown table row: ``| a | b |`` (an empty cell is ``| |``)."""
    return "|" + "|".join(f" {c} " if str(c) != "" else " " for c in cells) + "|"


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]] = (), align: str | Sequence[str] = "---") -> list[str]:
    """The lines of a Markdown table: the header, the alignment row and one line per row.

    ``align`` is one marker for every column (``"---"``, ``"---:"`` for right-aligned numbers) or
    one per column. Cells are written with ``str``; format numbers before passing them.
    """
    marks = [align] * len(header) if isinstance(align, str) else list(align)
    if len(marks) != len(header):
        raise ValueError(f"{len(marks)} alignment markers for {len(header)} columns")
    lines = [table_row(header), "|" + "|".join(marks) + "|"]
    lines += [table_row(row) for row in rows]
    return lines
