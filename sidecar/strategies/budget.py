"""Retry budget with Finagle/Linkerd semantics: every request deposits, every retry withdraws.

Retries may add at most `ratio` of the request rate (deposits count for `ttl`), plus
`min_per_second` retries a second that are always allowed (they accrue with time, at most one
second's worth at once; a new budget starts with that one second's reserve, so a sidecar that
has just started can still retry). A refused retry is reported by the retry strategy as
`budget_refused`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sidecar.clock import Clock

__all__ = ["RetryBudget", "RetryBudgetConfig"]

_SLOTS = 10


@dataclass(frozen=True)
class RetryBudgetConfig:
    ratio: float = 0.2
    min_per_second: float = 10.0
    ttl: float = 10.0


class RetryBudget:
    def __init__(self, config: RetryBudgetConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self._slot_len = config.ttl / _SLOTS
        self._deposits = [0.0] * _SLOTS
        self._withdrawals = [0.0] * _SLOTS
        self._slot_index = [-1] * _SLOTS
        now = clock.monotonic()
        self._free = self._cap()
        self._free_at = now
        self.deposited = 0
        self.withdrawn = 0
        self.refused = 0

    def _slot(self, now: float) -> int:
        absolute = math.floor(now / self._slot_len)
        i = absolute % _SLOTS
        if self._slot_index[i] != absolute:
            self._slot_index[i] = absolute
            self._deposits[i] = 0.0
            self._withdrawals[i] = 0.0
        return i

    def _window(self, now: float) -> tuple[float, float]:
        current = math.floor(now / self._slot_len)
        deposits = withdrawals = 0.0
        for i in range(_SLOTS):
            if current - self._slot_index[i] < _SLOTS:
                deposits += self._deposits[i]
                withdrawals += self._withdrawals[i]
        return deposits, withdrawals

    def _cap(self) -> float:
        rate = self.config.min_per_second
        return max(rate, 1.0) if rate > 0 else 0.0

    def _accrue(self, now: float) -> None:
        rate = self.config.min_per_second
        self._free = min(self._cap(), self._free + (now - self._free_at) * rate)
        self._free_at = now

    def deposit(self) -> None:
        now = self.clock.monotonic()
        self._deposits[self._slot(now)] += 1.0
        self.deposited += 1

    def available(self) -> float:
        now = self.clock.monotonic()
        self._accrue(now)
        deposits, withdrawals = self._window(now)
        return max(0.0, deposits * self.config.ratio - withdrawals) + self._free

    def try_withdraw(self) -> bool:
        now = self.clock.monotonic()
        self._accrue(now)
        deposits, withdrawals = self._window(now)
        if deposits * self.config.ratio - withdrawals >= 1.0:
            self._withdrawals[self._slot(now)] += 1.0
        elif self._free >= 1.0:
            self._free -= 1.0
        else:
            self.refused += 1
            return False
        self.withdrawn += 1
        return True
