"""Plain-text tables for terminals and summary files, shared by the server's report, the privacy ledger,
the audit, the CLI and the benchmarks (a leaf module: it imports nothing of fedtower's)."""

from __future__ import annotations

import math


def render_table(headers: list[str], rows: list[list[str]], title: str) -> str:
    """First column left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{cell:>{width}}" for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([title, line(headers), rule, *(line(row) for row in rows)])


def comparison_table(columns: dict[str, dict], keys: list[str]) -> str:
    """Metrics side by side: one row per metric, one column per model."""
    names = list(columns)
    width = max(len(k) for k in keys) + 2
    col = max(12, *(len(n) + 2 for n in names))
    lines = [" " * width + "".join(f"{n:>{col}}" for n in names), "-" * (width + col * len(names))]
    for key in keys:
        cells = []
        for name in names:
            value = columns[name].get(key, float("nan"))
            text = (
                "n/a"
                if isinstance(value, float) and math.isnan(value)
                else (f"{value:.4f}" if isinstance(value, float) else str(value))
            )
            cells.append(f"{text:>{col}}")
        lines.append(f"{key:<{width}}" + "".join(cells))
    return "\n".join(lines)
