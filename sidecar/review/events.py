"""The webhook events of the review queue and their JSON bodies.

Stdlib only: the stores build an event's body inside the transaction that commits the change it
reports (the outbox), and the dispatcher sends that body byte for byte, so a receiver can verify
the signature over exactly what was stored. Bodies carry the item's summary, never the caller's
request, the model's answer or a corrected answer: a receiver that needs those asks the review
API with a reviewer token.

    {"id": "<event id>", "type": "review.created" | "review.resolved",
     "occurred_at": "2026-11-27T09:00:00.000Z",
     "review": {"id", "route", "status", "confidence", "reason", "action", "request_id",
                "trace_id", "created_at", "decision", "reviewer", "resolved_at"}}
"""

from __future__ import annotations

import datetime
import json
import secrets

from sidecar.review.store import ReviewItem

__all__ = ["CREATED", "EVENT_KINDS", "RESOLVED", "event_body", "iso_time", "new_event_id"]

CREATED = "review.created"
RESOLVED = "review.resolved"
EVENT_KINDS = (CREATED, RESOLVED)


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_event_id() -> str:
    return secrets.token_hex(16)


def event_body(event_id: str, kind: str, item: ReviewItem, at: float) -> str:
    """The exact JSON text a receiver gets (and the signature covers)."""
    return json.dumps(
        {
            "id": event_id,
            "type": kind,
            "occurred_at": iso_time(at),
            "review": {
                "id": item.id,
                "route": item.route,
                "status": item.status.value,
                "confidence": item.confidence,
                "reason": item.reason,
                "action": item.action,
                "request_id": item.request_id,
                "trace_id": item.trace_id,
                "created_at": iso_time(item.created_at),
                "decision": item.decision.value if item.decision else None,
                "reviewer": item.reviewer,
                "resolved_at": iso_time(item.resolved_at),
            },
        },
        separators=(",", ":"),
    )
