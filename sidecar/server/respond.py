"""The one place where a failure becomes HTTP: status, headers and the JSON error envelope.

The envelope is a superset of OpenAI's error object, so OpenAI clients show it naturally:
`{"error": {"message", "type": "sidecar_error", "code", "failure_mode", "request_id", "trace_id"}}`.
"""

from __future__ import annotations

import json
import math

from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.outcome import Outcome

__all__ = [
    "DEFAULT_STATUS",
    "envelope",
    "error_status",
    "outcome_of",
    "sidecar_headers",
    "sse_error_event",
]

DEFAULT_STATUS: dict[FailureMode, int] = {
    FailureMode.CONNECT_ERROR: 502,
    FailureMode.ATTEMPT_TIMEOUT: 504,
    FailureMode.DEADLINE_EXCEEDED: 504,
    FailureMode.FIRST_BYTE_TIMEOUT: 504,
    FailureMode.STREAM_STALLED: 502,
    FailureMode.STREAM_INTERRUPTED: 502,
    FailureMode.UPSTREAM_5XX: 502,
    FailureMode.UPSTREAM_RATE_LIMITED: 429,
    FailureMode.INVALID_OUTPUT: 502,
    FailureMode.CIRCUIT_OPEN: 503,
    FailureMode.OVERLOADED: 503,
    FailureMode.LOW_CONFIDENCE: 422,
    FailureMode.CLIENT_ERROR: 400,
    FailureMode.CLIENT_CANCELLED: 499,
    FailureMode.USER_REPORTED: 400,
}


def error_status(err: SidecarError) -> int:
    return err.status if err.status is not None else DEFAULT_STATUS[err.mode]


def envelope(err: SidecarError, ctx: RequestContext | None, request_id: str = "") -> bytes:
    body = {
        "error": {
            "message": err.message,
            "type": "sidecar_error",
            "code": err.mode.value,
            "failure_mode": err.mode.value,
            "request_id": ctx.request_id if ctx else request_id,
            "trace_id": ctx.trace_id if ctx else "",
        }
    }
    for key, value in err.details.items():
        body["error"].setdefault(key, value)
    return json.dumps(body, separators=(",", ":")).encode()


def sse_error_event(err: SidecarError, ctx: RequestContext | None) -> bytes:
    """The final event of a stream that failed after its first byte (no `[DONE]` follows)."""
    return b"event: error\ndata: " + envelope(err, ctx) + b"\n\n"


def outcome_of(ctx: RequestContext) -> Outcome:
    if ctx.outcome is not None:
        return ctx.outcome
    if ctx.failure_mode is not None:
        return Outcome.ERROR
    return Outcome.RETRIED if ctx.attempts > 1 else Outcome.OK


def sidecar_headers(ctx: RequestContext, err: SidecarError | None = None) -> list[tuple[str, str]]:
    """`x-request-id`, `x-trace-id`, `x-sidecar-*` and `Retry-After` for a response."""
    headers = [("x-request-id", ctx.request_id)]
    if ctx.trace_id:
        headers.append(("x-trace-id", ctx.trace_id))
    headers.append(("x-sidecar-outcome", outcome_of(ctx).value))
    mode = err.mode if err is not None else ctx.failure_mode
    if mode is not None:
        headers.append(("x-sidecar-failure-mode", mode.value))
    if ctx.fallback_kind:
        headers.append(("x-sidecar-fallback", ctx.fallback_kind))
    if ctx.confidence is not None:
        headers.append(("x-sidecar-confidence", f"{ctx.confidence:.4f}"))
    if ctx.review_id:
        headers.append(("x-sidecar-review-id", ctx.review_id))
    if err is not None:
        if err.retry_after is not None:
            headers.append(("Retry-After", str(max(1, math.ceil(err.retry_after)))))
        headers.extend(err.headers.items())
    return headers
