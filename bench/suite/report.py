"""Plain-text tables for the terminal and for bench/README.md (Markdown pipes).

Why Markdown: the tables the run prints are pasted into the README as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def fmt(value: float | int | str | None, digits: int = 1) -> str:
    if value is None:
        return "pending"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def fx(value: float) -> str:
    """A ratio: ``2.31x``."""
    return "-" if math.isnan(value) else f"{value:.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)
