"""Rates with sample counts and 95 % Wilson score intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    hits: int
    n: int

    @property
    def value(self) -> float | None:
        return self.hits / self.n if self.n else None

    def wilson(self, z: float = 1.959963984540054) -> tuple[float, float] | None:
        return wilson_interval(self.hits, self.n, z)

    def to_dict(self) -> dict:
        ci = self.wilson()
        return {"value": self.value, "hits": self.hits, "n": self.n, "ci95": list(ci) if ci else None}


def wilson_interval(hits: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """95 % Wilson score interval for a binomial proportion; None when n == 0."""
    if n <= 0:
        return None
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    if hits == 0:  # exact ends: float rounding gave 1.7e-18 and 0.9999999999999999
        return 0.0, min(1.0, centre + half)
    if hits == n:
        return max(0.0, centre - half), 1.0
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference_interval(
    first: Sequence[bool], second: Sequence[bool], z: float = 1.959963984540054
) -> tuple[float, float] | None:
    """95 % interval for P(first) - P(second) measured on the same images (paired): Newcombe's
    hybrid score method (method 10, Statistics in Medicine 1998), built from the Wilson intervals of
    the two proportions and their correlation. None when there are no pairs."""
    n = len(first)
    if n == 0 or len(second) != n:
        return None
    a = sum(1 for f, s in zip(first, second, strict=True) if f and s)
    b = sum(1 for f, s in zip(first, second, strict=True) if f and not s)
    c = sum(1 for f, s in zip(first, second, strict=True) if s and not f)
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(denominator) if denominator else 0.0
    diff = p1 - p2
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, diff - lower), min(1.0, diff + upper)
