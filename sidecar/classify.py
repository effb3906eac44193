"""Classify once: turn an upstream response or an error into a `FailureMode`, or None for success.

Core module (stdlib only). Retry, breaker and budget consume this; they never look at statuses or
exceptions themselves.
"""

from __future__ import annotations

import asyncio

from sidecar.errors import AVAILABILITY_MODES, FailureMode, SidecarError

__all__ = ["classify_error", "classify_status", "counts_against_upstream"]


def classify_status(status: int) -> FailureMode | None:
    if status == 429:
        return FailureMode.UPSTREAM_RATE_LIMITED
    if 500 <= status <= 599:
        return FailureMode.UPSTREAM_5XX
    return None


def classify_error(exc: BaseException) -> FailureMode:
    if isinstance(exc, SidecarError):
        return exc.mode
    if isinstance(exc, asyncio.CancelledError):
        return FailureMode.CLIENT_CANCELLED
    if isinstance(exc, TimeoutError):
        return FailureMode.ATTEMPT_TIMEOUT
    if isinstance(exc, ConnectionError | OSError):
        return FailureMode.CONNECT_ERROR
    return FailureMode.STREAM_INTERRUPTED


def counts_against_upstream(mode: FailureMode | None) -> bool:
    """Only availability failures feed breakers and budgets; client errors, cancellations and
    low confidence never do."""
    return mode is not None and mode in AVAILABILITY_MODES
