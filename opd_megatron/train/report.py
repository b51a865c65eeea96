"""Result tables for the console."""

from __future__ import annotations


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        table.add_row(*[str(x) for x in r])
    Console(width=max(80, sum(len(c) + 6 for c in columns))).print(table)
