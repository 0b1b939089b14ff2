"""Small statistics shared by calibrate, verify and the summaries (no numpy)."""

from __future__ import annotations

import math

#: z for two-sided 95 % intervals.
Z95 = 1.959963984540054


def interval95(k: int, n: int) -> list[float] | None:
    """95 % interval of a proportion k/n: Wilson score, and the rule of three at 0 of n (and n of n).
    None where n is 0."""
    if n <= 0:
        return None
    if k == 0:
        return [0.0, min(1.0, 3.0 / n)]
    if k == n:
        return [max(0.0, 1.0 - 3.0 / n), 1.0]
    p, z2 = k / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def proportion(k: int, n: int) -> dict:
    """``{"k", "n", "rate", "ci95"}`` of a proportion."""
    return {"k": int(k), "n": int(n), "rate": (k / n) if n else None, "ci95": interval95(k, n)}
