"""The benchmarks' markdown tables."""
from __future__ import annotations


def markdown(columns: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A markdown table's lines; align holds one letter per column, "l" (text) or "r" (numbers)."""
    rule = {"l": "---", "r": "---:"}
    return ["| " + " | ".join(columns) + " |", "| " + " | ".join(rule[a] for a in align) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]
