"""Tables for the terminal (rich) and for Markdown, from lists of row dicts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


def human(value: Any) -> str:
    """Readable numbers: 1234567 → 1.23M; floats to 4 significant digits; None → '–'."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(value) >= size:
                return f"{value / size:.3g}{unit}"
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def rich_table(title: str, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> Table:
    """A rich Table with one row per dict (missing keys shown as '–')."""
    table = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        table.add_column(
            column, justify="left" if column in {"layer", "method", "type"} else "right"
        )
    for row in rows:
        table.add_row(*(human(row.get(c)) for c in columns))
    return table


def print_table(title: str, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """Print a table to the terminal (plain text when not a TTY)."""
    Console(width=160).print(rich_table(title, columns, rows))


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(human(row.get(c)).replace("|", "/") for c in columns) + " |")
    return "\n".join(lines)
