"""The bench's one table: each row a figure, its target and whether it was met."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Comparison = Literal["<=", "==", ">="]
_COMPARE: dict[Comparison, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "==": operator.eq,
    ">=": operator.ge,
}


@dataclass(frozen=True)
class Row:
    """One line of the table. ``target`` None: shown for information, no verdict."""

    section: str
    figure: str
    value: float
    unit: str = ""
    target: float | None = None
    comparison: Comparison = "<="
    digits: int = 0
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "PASS" if _COMPARE[self.comparison](round(self.value, self.digits), self.target) else "MISS"

    def shown_value(self) -> str:
        text = f"{self.value:,.{self.digits}f}"
        return f"{text} {self.unit}".rstrip()

    def shown_target(self) -> str:
        if self.target is None:
            return ""
        target = f"{self.target:g}" if self.target < 1000 else f"{self.target:,.0f}"
        return f"{self.comparison} {target} {self.unit}".rstrip()


_HEADERS = ("", "figure", "value", "target", "")


def render_table(rows: Sequence[Row], *, markdown: bool = False) -> str:
    """The rows as an aligned text table, or a Markdown table for docs/benchmarks.md."""
    lines: list[tuple[str, ...]] = []
    previous_section = None
    for row in rows:
        section = row.section if row.section != previous_section else ""
        previous_section = row.section
        figure = f"{row.figure} ({row.note})" if row.note else row.figure
        lines.append((section, figure, row.shown_value(), row.shown_target(), row.verdict))
    if markdown:
        out = ["| row | figure | value | target | result |", "|---|---|--:|---|---|"]
        out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(line[i]) for line in [*lines, _HEADERS]) for i in range(len(_HEADERS))]
    aligned = ["<", "<", ">", "<", "<"]

    def fmt(line: tuple[str, ...]) -> str:
        return "  ".join(f"{cell:{aligned[i]}{widths[i]}}" for i, cell in enumerate(line)).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([fmt(_HEADERS), rule, *(fmt(line) for line in lines)])
