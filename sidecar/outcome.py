"""What the caller got, as one word: the value of `x-sidecar-outcome`.

Core module (stdlib only).
"""

from __future__ import annotations

import enum

__all__ = ["Outcome"]


class Outcome(enum.StrEnum):
    OK = "ok"
    RETRIED = "retried"
    FALLBACK = "fallback"
    ESCALATED = "escalated"
    REJECTED = "rejected"
    ERROR = "error"
