"""Printing byte sizes and labelled rows (the bottom of the package: every layer prints sizes,
errors included)."""
from __future__ import annotations


def format_bytes(n: float) -> str:
    """Human-readable binary size: 1536 -> '1.50 KiB'."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def labelled_rows(rows: list[tuple[str, str]], width: int = 0) -> str:
    """``label  value`` lines, values aligned after the longest label (or ``width``)."""
    width = max([width] + [len(label) for label, _ in rows])
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
