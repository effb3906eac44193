"""What a review store keeps and the protocol every backend implements.

Stdlib only. The confidence gate (through `sidecar.review.desk`) and the reviewer API speak these
types; `sidecar.review.sqlite` is the embedded backend, and a PostgreSQL backend for several
replicas sharing one queue implements the same `ReviewStore` protocol.

Contract of a backend:
- `enqueue` is idempotent by request id: a retried request gets the item already stored
  (`created=False`), never a second one. It returns only after the item is durably committed.
- `claim` takes a lease that expires; an expired lease makes the item pending again, and the
  same reviewer may renew their own lease. `claim_next` takes the oldest pending item; concurrent
  callers (in one process or in several replicas sharing the store) never get the same item.
- `resolve` succeeds once. A second resolve, or a resolve while someone else holds a live lease,
  raises `ReviewConflict`.
- `purge` deletes resolved items older than the retention; pending work is never dropped.
- With an outbox (`outbox_limit`), a new item and a resolution each add a webhook event in the
  same transaction, so an event exists exactly when its change was committed. The outbox keeps at
  most `outbox_limit` events (the oldest go first); `outbox_take` leases due events so that two
  dispatchers sharing the store never send the same event at the same time.
- Every failure of the backend itself (disk, permissions, corruption, an unreachable database)
  raises `ReviewStoreError`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "Decision",
    "EnqueueResult",
    "NewReview",
    "OutboxEvent",
    "Resolution",
    "ReviewConflict",
    "ReviewError",
    "ReviewItem",
    "ReviewNotFound",
    "ReviewPage",
    "ReviewQuery",
    "ReviewQueue",
    "ReviewStatus",
    "ReviewStore",
    "ReviewStoreError",
    "ReviewTicket",
]


class ReviewStatus(enum.StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    RESOLVED = "resolved"


class Decision(enum.StrEnum):
    APPROVE = "approve"
    #: The reviewer replaces the model's answer with a corrected one.
    OVERRIDE = "override"
    REJECT = "reject"


class ReviewError(Exception):
    """Base of the store's errors."""


class ReviewNotFound(ReviewError):
    pass


class ReviewConflict(ReviewError):
    """The item is already resolved, or someone else holds its lease."""


class ReviewStoreError(ReviewError):
    """The backend itself failed (I/O, permissions, a corrupt file): nothing was stored."""


@dataclass(frozen=True)
class NewReview:
    """An answer handed to humans: what was asked, what the model said, and why."""

    request_id: str
    trace_id: str
    route: str
    #: Why it was queued: "review" | "reject" | "missing" (the band) or "audit" (sampled).
    reason: str
    #: The gate's action: "escalate" | "hold" | ... ("audit" for sampled auto answers).
    action: str
    confidence: float | None
    #: {"method", "path", "content_type", "body", "body_truncated"}
    request: dict[str, Any]
    #: {"status", "content_type", "body", "body_truncated"}
    answer: dict[str, Any]


@dataclass(frozen=True)
class ReviewItem:
    id: str
    request_id: str
    trace_id: str
    route: str
    reason: str
    action: str
    confidence: float | None
    request: dict[str, Any]
    answer: dict[str, Any]
    #: The effective status: a claim whose lease expired reads as pending.
    status: ReviewStatus
    created_at: float
    claimed_by: str | None = None
    lease_until: float | None = None
    decision: Decision | None = None
    reviewer: str | None = None
    note: str | None = None
    #: The reviewer's answer for an `override` decision.
    corrected: Any = None
    resolved_at: float | None = None


@dataclass(frozen=True)
class EnqueueResult:
    item: ReviewItem
    #: False when an item for this request id already existed (a retried request).
    created: bool


@dataclass(frozen=True)
class Resolution:
    decision: Decision
    reviewer: str
    note: str | None = None
    corrected: Any = None


@dataclass(frozen=True)
class ReviewQuery:
    route: str | None = None
    status: ReviewStatus | None = None
    #: Only items created at least this many seconds ago.
    min_age: float | None = None
    #: Only items created at most this many seconds ago.
    max_age: float | None = None
    limit: int = 50
    #: Opaque position from a previous page's `next_cursor`.
    cursor: str | None = None


@dataclass(frozen=True)
class ReviewPage:
    items: list[ReviewItem] = field(default_factory=list)
    next_cursor: str | None = None


@dataclass(frozen=True)
class OutboxEvent:
    """A webhook event waiting to be delivered: `payload` is the exact JSON body to send."""

    id: str
    kind: str
    review_id: str
    payload: str
    created_at: float
    attempts: int
    next_attempt_at: float
    last_error: str | None = None


class ReviewStore(Protocol):
    #: Events dropped from a full outbox since this store was opened.
    outbox_dropped: int

    async def enqueue(self, review: NewReview) -> EnqueueResult: ...

    async def get(self, review_id: str) -> ReviewItem | None: ...

    async def list(self, query: ReviewQuery) -> ReviewPage: ...

    async def claim(self, review_id: str, reviewer: str, lease: float) -> ReviewItem: ...

    async def claim_next(
        self, reviewer: str, lease: float, route: str | None = None
    ) -> ReviewItem | None:
        """Claim the oldest pending item (of `route`); None when nothing is pending."""
        ...

    async def resolve(self, review_id: str, resolution: Resolution) -> ReviewItem: ...

    async def backlog(self) -> tuple[int, float | None]:
        """Unresolved items, and when (epoch seconds) the oldest of them was queued."""
        ...

    async def purge(self, older_than: float) -> int: ...

    async def capability_secret(self) -> bytes | None:
        """The key of capability status URLs when the store shares it between replicas (in
        the database); None when it lives in the state directory."""
        ...

    async def outbox_take(self, now: float, limit: int, lease: float) -> Sequence[OutboxEvent]:
        """Due events, oldest first, each leased for `lease` seconds to this caller."""
        ...

    async def outbox_delivered(self, event_id: str) -> None: ...

    async def outbox_retry(self, event_id: str, next_attempt_at: float, error: str) -> None:
        """Count a failed attempt and make the event due again at `next_attempt_at`."""
        ...

    async def outbox_expire(self, created_before: float) -> int:
        """Drop undelivered events created before this time; returns how many."""
        ...

    async def outbox_size(self) -> int: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class ReviewTicket:
    """What the gate tells a caller about a queued item (only after it was committed)."""

    review_id: str
    #: A capability URL: readable without a token, showing only status and decision.
    status_url: str
    created: bool


class ReviewQueue(Protocol):
    """What the confidence gate needs from the review side (`sidecar.review.desk.ReviewDesk`)."""

    async def submit(self, review: NewReview) -> ReviewTicket: ...

    async def wait_decision(self, review_id: str, timeout: float) -> ReviewItem | None: ...
