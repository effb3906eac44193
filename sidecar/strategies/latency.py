"""Recent attempt latencies per upstream: the median for deadline-aware retries and the p95 for
hedging. A fixed-size ring, so memory does not grow with traffic."""

from __future__ import annotations

import math

__all__ = ["LatencyTracker"]


class LatencyTracker:
    def __init__(self, size: int = 128) -> None:
        self._values = [0.0] * size
        self._count = 0
        self._next = 0

    def record(self, seconds: float) -> None:
        self._values[self._next] = seconds
        self._next = (self._next + 1) % len(self._values)
        self._count = min(self._count + 1, len(self._values))

    def quantile(self, q: float) -> float | None:
        if self._count == 0:
            return None
        ordered = sorted(self._values[: self._count])
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[index]

    def median(self) -> float | None:
        return self.quantile(0.5)
