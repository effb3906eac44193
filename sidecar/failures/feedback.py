"""`POST /feedback` on the admin listener: the application reports an answer as wrong after the
fact (bearer token of the `app` scope, `SIDECAR_APP_TOKEN`).

    POST /feedback  {"request_id": "...", "note": "...", "label": "wrong", "trace_id": "...",
                     "corrected": <any JSON>}

Only `request_id` is required. The answer is 201 with the stored record's id once it is committed,
and `linked` says whether the original request was found (a stored failure record of it, or a
request this process answered lately); an unknown request id is still recorded, unlinked. Bad
input gets 400 with a message naming the field; a store that cannot write gets 503.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from sidecar.errors import FailureMode, SidecarError
from sidecar.failures.capture import Feedback
from sidecar.failures.store import FailureStoreError
from sidecar.server.admin import error_json, json_response, require_scope
from sidecar.server.state import STATE

__all__ = ["add_feedback_routes", "parse_feedback"]

# The proxy's own rule for request ids it accepts from callers.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_FIELDS = ("request_id", "note", "label", "trace_id", "corrected")
_MAX_BODY = 64 * 1024
_MAX_NOTE = 4000
_MAX_LABEL = 100
_MAX_CORRECTED = 16 * 1024


class FeedbackError(ValueError):
    pass


def parse_feedback(raw: bytes) -> Feedback:
    """Validate a feedback body; `FeedbackError` with a message for the caller."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise FeedbackError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FeedbackError(
            'the body must be a JSON object like {"request_id": "...", "note": ...}'
        )
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise FeedbackError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(_FIELDS)}")
    request_id = data.get("request_id")
    if request_id is None:
        raise FeedbackError("request_id is required (the x-request-id of the answer)")
    if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
        raise FeedbackError("request_id must be 1-128 characters of [A-Za-z0-9._:@/+=-]")
    note = data.get("note")
    if note is not None and (not isinstance(note, str) or len(note) > _MAX_NOTE):
        raise FeedbackError(f"note must be a string of at most {_MAX_NOTE} characters")
    label = data.get("label")
    if label is not None and (not isinstance(label, str) or not 0 < len(label) <= _MAX_LABEL):
        raise FeedbackError(f"label must be a string of 1-{_MAX_LABEL} characters")
    trace_id = data.get("trace_id")
    if trace_id is not None and (not isinstance(trace_id, str) or not _TRACE_ID.match(trace_id)):
        raise FeedbackError("trace_id must be 32 lower-case hex digits (the x-trace-id)")
    corrected: Any = data.get("corrected")
    if corrected is not None and len(json.dumps(corrected)) > _MAX_CORRECTED:
        raise FeedbackError(f"corrected must be at most {_MAX_CORRECTED} bytes of JSON")
    return Feedback(
        request_id=request_id, note=note, label=label, trace_id=trace_id, corrected=corrected
    )


def _bad(message: str, status: int = 400) -> web.Response:
    return error_json(SidecarError(FailureMode.CLIENT_ERROR, message, status=status))


@require_scope("app")
async def post_feedback(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    recorder = state.failures
    if recorder is None or not recorder.config().enabled:
        return error_json(
            SidecarError(
                FailureMode.OVERLOADED,
                "failure capture is off (policy failures.enabled: false)",
                status=503,
            )
        )
    if request.content_length is not None and request.content_length > _MAX_BODY:
        return _bad(f"the body is over {_MAX_BODY} bytes", status=413)
    raw = await request.content.read(_MAX_BODY + 1)
    if len(raw) > _MAX_BODY:
        return _bad(f"the body is over {_MAX_BODY} bytes", status=413)
    try:
        feedback = parse_feedback(raw)
    except FeedbackError as exc:
        return _bad(str(exc))
    try:
        result = await recorder.report(feedback)
    except FailureStoreError:
        return error_json(
            SidecarError(
                FailureMode.OVERLOADED,
                "the failure store is unavailable; the feedback was not stored",
                status=503,
                retry_after=5,
            )
        )
    record = result.record
    return json_response(
        {
            "id": record.id,
            "request_id": record.request_id,
            "trace_id": record.trace_id or None,
            "route": record.route,
            "linked": result.linked,
            "linked_via": result.linked_via,
        },
        status=201,
    )


def add_feedback_routes(app: web.Application) -> None:
    app.router.add_post("/feedback", post_feedback)
