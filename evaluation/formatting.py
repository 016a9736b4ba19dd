"""How reports and command lines write numbers: one place, so every report says "n/a" for a missing
value (JSON null: no data, or an infinite PSNR) and rounds alike."""
from __future__ import annotations


def num(value, digits: int = 2, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def pct(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}%}"


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])
