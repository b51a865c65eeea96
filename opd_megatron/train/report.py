"""Result tables for the console, and the demo's table as data (per-seed cells, mean and std)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        table.add_row(*[str(x) for x in r])
    Console(width=max(80, sum(len(c) + 6 for c in columns))).print(table)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def demo_results(per_seed: list[dict], columns: list[str], domains: list[str]) -> dict:
    """The table as data: for every column and row (each domain, then ``mean`` over domains) the value
    of every seed, their mean and std. ``per_seed[k]["cells"][column][domain]`` is seed k's value."""
    rows = [*domains, "mean"]
    cells = {}
    for c in columns:
        cells[c] = {}
        for r in rows:
            vals = [
                sum(s["cells"][c][d] for d in domains) / len(domains) if r == "mean" else s["cells"][c][r]
                for s in per_seed
            ]
            m, sd = mean_std(vals)
            cells[c][r] = {"seeds": vals, "mean": m, "std": sd}
    return {"columns": columns, "rows": rows, "cells": cells}


def format_cell(cell: dict, n_seeds: int) -> str:
    return f"{cell['mean']:.2f}" if n_seeds == 1 else f"{cell['mean']:.2f} ± {cell['std']:.2f}"


def table_rows(table: dict) -> list[list[str]]:
    """The printed rows of :func:`demo_results`' table (the first entry of each is the row name)."""
    n = len(table["cells"][table["columns"][0]][table["rows"][0]]["seeds"])
    return [[r] + [format_cell(table["cells"][c][r], n) for c in table["columns"]] for r in table["rows"]]


def print_demo_table(table: dict, title: str) -> None:
    print_table(title, ["domain", *table["columns"]], table_rows(table))


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def markdown_table(table: dict) -> str:
    """:func:`demo_results`' table as GitHub markdown (for READMEs and reports)."""
    head = ["domain", *table["columns"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(table)]
    return "\n".join(lines)
