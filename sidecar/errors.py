"""The failure vocabulary: one enum of failure modes and one error type that carries a mode.

Core module (stdlib only). Logs, spans, metrics, headers, stored records and tests all speak in
`FailureMode` values; mapping a `SidecarError` to HTTP happens only in `sidecar.server.respond`.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["AVAILABILITY_MODES", "FailureMode", "SidecarError"]


class FailureMode(enum.StrEnum):
    CONNECT_ERROR = "connect_error"
    ATTEMPT_TIMEOUT = "attempt_timeout"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    FIRST_BYTE_TIMEOUT = "first_byte_timeout"
    STREAM_STALLED = "stream_stalled"
    STREAM_INTERRUPTED = "stream_interrupted"
    UPSTREAM_5XX = "upstream_5xx"
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited"
    INVALID_OUTPUT = "invalid_output"
    CIRCUIT_OPEN = "circuit_open"
    OVERLOADED = "overloaded"
    LOW_CONFIDENCE = "low_confidence"
    CLIENT_ERROR = "client_error"
    CLIENT_CANCELLED = "client_cancelled"
    USER_REPORTED = "user_reported"


#: Failures of the model server itself: only these feed breakers and retry budgets.
AVAILABILITY_MODES: frozenset[FailureMode] = frozenset(
    {
        FailureMode.CONNECT_ERROR,
        FailureMode.ATTEMPT_TIMEOUT,
        FailureMode.FIRST_BYTE_TIMEOUT,
        FailureMode.STREAM_STALLED,
        FailureMode.STREAM_INTERRUPTED,
        FailureMode.UPSTREAM_5XX,
        FailureMode.UPSTREAM_RATE_LIMITED,
        FailureMode.INVALID_OUTPUT,
    }
)


class SidecarError(Exception):
    """A failure the sidecar answers for itself.

    `status` overrides the default status of the mode (e.g. 413 or 431 for a `client_error`);
    `retry_after` (seconds) becomes a `Retry-After` header; `headers` are added to the answer;
    `details` (JSON-able) are added to the envelope's error object, e.g. the `request_info` hint
    of the confidence gate.
    """

    def __init__(
        self,
        mode: FailureMode,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.mode = mode
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.headers = dict(headers or {})
        self.details = dict(details or {})

    def __repr__(self) -> str:
        return f"SidecarError({self.mode.value!r}, {self.message!r})"
