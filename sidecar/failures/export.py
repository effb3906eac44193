"""JSONL exports: `sidecar failures export` (stored failure records) and `sidecar reviews export`
(labelled examples: input, model answer, confidence, reviewer decision, corrected answer).

Failure records are stored redacted, so they are written as stored (excerpts parsed back into
JSON). Review items hold what the reviewers saw, unredacted; the export redacts them with the
policy's `failures.redact` rules (emails and card numbers by default) unless told not to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TextIO

from sidecar.failures.labels import example_of, read_reviews
from sidecar.failures.redact import Redactor
from sidecar.failures.report import collect_records
from sidecar.failures.store import FailureRecord, FailureStore, RecordKind
from sidecar.failures.timerange import format_time
from sidecar.review.store import ReviewStore

__all__ = ["export_failures", "export_reviews", "failure_line"]


def _parsed(excerpt: str | None) -> Any:
    if excerpt is None:
        return None
    try:
        return json.loads(excerpt)
    except ValueError:
        return excerpt


def failure_line(record: FailureRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "time": format_time(record.time),
        "epoch": record.time,
        "kind": record.kind.value,
        "route": record.route,
        "upstream": record.upstream,
        "mode": record.mode,
        "outcome": record.outcome,
        "status": record.status,
        "request_id": record.request_id,
        "trace_id": record.trace_id,
        "attempts": record.attempts,
        "retries": record.retries,
        "latency_ms": record.latency_ms,
        "upstream_ms": record.upstream_ms,
        "breaker_state": record.breaker_state,
        "confidence": record.confidence,
        "confidence_band": record.confidence_band,
        "retry_budget_exhausted": record.retry_budget_exhausted,
        "fallback_kind": record.fallback_kind,
        "review_id": record.review_id,
        "upstream_status": record.upstream_status,
        "method": record.method,
        "path": record.path,
        "cause": record.cause,
        "note": record.note,
        "request": _parsed(record.request_excerpt),
        "response": _parsed(record.response_excerpt),
        "detail": record.detail,
    }


def _write(out: TextIO, data: dict[str, Any]) -> None:
    out.write(json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str))
    out.write("\n")


async def export_failures(
    store: FailureStore,
    out: TextIO,
    since: float,
    until: float,
    route: str | None = None,
    modes: Sequence[str] | None = None,
    kinds: Sequence[RecordKind] | None = None,
) -> int:
    records = await collect_records(
        store,
        since,
        until,
        route,
        kinds=tuple(kinds) if kinds else None,
        modes=tuple(modes) if modes else None,
    )
    for record in records:
        _write(out, failure_line(record))
    return len(records)


async def export_reviews(
    store: ReviewStore,
    out: TextIO,
    *,
    redactor: Redactor | None,
    route: str | None = None,
    since: float | None = None,
    until: float | None = None,
    resolved_only: bool = True,
) -> int:
    items = await read_reviews(
        store, route=route, since=since, until=until, resolved_only=resolved_only
    )
    for item in items:
        _write(out, example_of(item, redactor))
    return len(items)
