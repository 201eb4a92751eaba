"""Rates with sample counts and 95 % Wilson score intervals."""

from __future__ import annotations

import math
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
