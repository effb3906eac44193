"""What the failure store keeps and the protocol every backend implements.

Stdlib only. The recorder (`sidecar.failures.capture`) writes records and per-minute request
counts; the report, the export and the feedback endpoint read them. `sidecar.failures.sqlite` is
the embedded backend; a PostgreSQL backend for several replicas implements the same
`FailureStore` protocol.

Contract of a backend:
- `write` stores records and adds request counts in one transaction and returns only after it
  committed. Records arrive already redacted: a backend stores what it is given.
- `list` pages through records in (time, id) order; a page's `next_cursor` resumes after it.
- `request_counts` sums the per-minute counters between two times.
- `purge` deletes records and counters older than `max_age` seconds, then the oldest records
  beyond `max_rows`.
- Every failure of the backend itself (disk, permissions, corruption) raises `FailureStoreError`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "RECORD_COLUMNS",
    "FailurePage",
    "FailureQuery",
    "FailureRecord",
    "FailureStore",
    "FailureStoreError",
    "RecordKind",
    "RequestCount",
    "decode_cursor",
    "encode_cursor",
    "record_from_row",
    "record_values",
]


class RecordKind(enum.StrEnum):
    #: A request that failed, fell back, was shed, escalated or rejected.
    REQUEST = "request"
    #: A circuit breaker transition (the report's recovery times come from these).
    BREAKER = "breaker"
    #: The application reported an answer as wrong after the fact (`POST /feedback`).
    FEEDBACK = "feedback"


class FailureStoreError(Exception):
    """The backend itself failed (I/O, permissions, a corrupt file): nothing was stored."""


@dataclass(frozen=True)
class FailureRecord:
    """One stored failure. Excerpts are JSON text, already redacted and capped."""

    id: str
    #: Epoch seconds (wall clock) when the request ended or the event happened.
    time: float
    kind: RecordKind
    route: str
    upstream: str
    #: A `FailureMode` value; None for breaker transitions.
    mode: str | None
    #: An `Outcome` value for requests; for breaker records, the state entered.
    outcome: str
    request_id: str = ""
    trace_id: str = ""
    status: int | None = None
    attempts: int = 0
    retries: int = 0
    latency_ms: float | None = None
    upstream_ms: float | None = None
    breaker_state: str | None = None
    confidence: float | None = None
    confidence_band: str | None = None
    #: A retry was refused by the retry budget (the `budget_refused` event).
    retry_budget_exhausted: bool = False
    fallback_kind: str | None = None
    review_id: str | None = None
    upstream_status: int | None = None
    method: str = ""
    path: str = ""
    #: A short, redacted description: the error's message, or the upstream status.
    cause: str | None = None
    request_excerpt: str | None = None
    response_excerpt: str | None = None
    #: Feedback: the application's note (redacted).
    note: str | None = None
    #: JSON-able extras: breaker `from`/`to`/`recovery_seconds`, feedback `linked`, events.
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestCount:
    """Requests that ended in one minute (epoch seconds of its start), by route and outcome."""

    minute: int
    route: str
    outcome: str
    count: int


@dataclass(frozen=True)
class FailureQuery:
    #: Epoch seconds, inclusive.
    since: float | None = None
    #: Epoch seconds, exclusive.
    until: float | None = None
    route: str | None = None
    kinds: tuple[RecordKind, ...] | None = None
    modes: tuple[str, ...] | None = None
    request_id: str | None = None
    limit: int = 500
    #: Opaque position from a previous page's `next_cursor`.
    cursor: str | None = None
    #: Newest first (the feedback lookup wants the latest record of a request).
    newest_first: bool = False


@dataclass(frozen=True)
class FailurePage:
    records: list[FailureRecord] = field(default_factory=list)
    next_cursor: str | None = None


class FailureStore(Protocol):
    async def write(
        self, records: Sequence[FailureRecord], counts: Sequence[RequestCount]
    ) -> None: ...

    async def list(self, query: FailureQuery) -> FailurePage: ...

    async def request_counts(
        self, since: float | None, until: float | None, route: str | None = None
    ) -> Sequence[RequestCount]: ...

    async def purge(self, now: float, max_age: float, max_rows: int | None) -> int: ...

    async def close(self) -> None: ...


#: The stored columns of a failure record, in insert order (shared by every backend).
RECORD_COLUMNS = (
    "id",
    "time",
    "kind",
    "route",
    "upstream",
    "mode",
    "outcome",
    "request_id",
    "trace_id",
    "status",
    "attempts",
    "retries",
    "latency_ms",
    "upstream_ms",
    "breaker_state",
    "confidence",
    "confidence_band",
    "retry_budget_exhausted",
    "fallback_kind",
    "review_id",
    "upstream_status",
    "method",
    "path",
    "cause",
    "request_excerpt",
    "response_excerpt",
    "note",
    "detail",
)


_CURSOR = re.compile(r"^(-?[0-9]{1,12}(?:\.[0-9]{1,9})?(?:e[+-]?[0-9]+)?)_([0-9a-f]{1,64})$")


def encode_cursor(record: FailureRecord) -> str:
    """The paging cursor after `record` (its time and id), the same for every backend."""
    return f"{record.time!r}_{record.id}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    match = _CURSOR.fullmatch(cursor)
    if match is None:
        raise ValueError("cursor is not one this store gave out")
    return float(match.group(1)), match.group(2)


def record_values(
    record: FailureRecord, *, flag: Callable[[bool], Any], detail: Callable[[Any], Any]
) -> tuple[Any, ...]:
    """A record as column values in `RECORD_COLUMNS` order; `flag` and `detail` say how this
    backend stores a boolean and the detail document."""
    values: list[Any] = []
    for name in RECORD_COLUMNS:
        value = getattr(record, name)
        if name == "kind":
            value = value.value
        elif name == "retry_budget_exhausted":
            value = flag(value)
        elif name == "detail":
            value = detail(value)
        values.append(value)
    return tuple(values)


def record_from_row(row: Mapping[str, Any], *, detail: Callable[[Any], Any]) -> FailureRecord:
    """A stored row back as a record; `detail` decodes this backend's detail column."""
    fields: dict[str, Any] = {name: row[name] for name in RECORD_COLUMNS}
    fields["kind"] = RecordKind(fields["kind"])
    fields["retry_budget_exhausted"] = bool(fields["retry_budget_exhausted"])
    fields["detail"] = detail(fields["detail"])
    return FailureRecord(**fields)
