"""Units: parse and format parameter counts ("3B", "60M", "1.5e9") and durations. Pure, no torch."""

from __future__ import annotations

import math
import re

from minima_cli.errors import MinimaError


def format_count(n: float) -> str:
    """Human-readable parameter count: 3.02B, 134.5M, 812K."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n:.0f}"


SIZE_SUFFIXES = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_size(text: str) -> int:
    """'3B' -> 3_000_000_000; '60M', '1.5e9', '135000000' also work."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KkMmBbGgTt]?)\s*", text)
    if not match:
        raise MinimaError(f"--params {text!r} is not a size like 3B, 60M or 1.5e9")
    return round(float(match.group(1)) * SIZE_SUFFIXES[match.group(2).upper()])


def format_seconds(seconds: float | None) -> str:
    """Wall time for tables: 42s, 12.5min; '-' when unknown."""
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds:.0f}s" if seconds < 600 else f"{seconds / 60:.1f}min"
