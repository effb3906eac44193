"""The shared review store: PostgreSQL, for several replicas working one queue.

Same contract as the SQLite store (`sidecar.review.store`). Differences that matter:
- Concurrency comes from the database, not from one writer thread: a claim locks its row with
  `FOR UPDATE SKIP LOCKED`, so of two replicas claiming the same item one wins and the other is
  told at once that someone else has it, and `claim_next` hands concurrent reviewers different
  items without waiting on each other. A resolve waits for the row lock (`FOR UPDATE`) and then
  decides on the committed state, so it succeeds exactly once.
- `enqueue` returns after PostgreSQL committed the item (`synchronous_commit` as the server has
  it, `on` by default: flushed to the WAL on disk).
- Times are epoch seconds from the sidecar's clock, as in SQLite (leases assume replicas' clocks
  agree, as NTP keeps them).
- The capability key of status URLs lives in the database (`sidecar_keys`), so a status URL
  given out by one replica is honoured by all of them.
- Migrations run on first use (and at start, and with `sidecar migrate`); a database that cannot
  be reached raises `ReviewStoreError` naming the server, and the gate fails closed.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from psycopg.types.json import Jsonb

from sidecar.clock import Clock, MonotonicClock
from sidecar.database import Database, DatabaseError, Migration
from sidecar.review.cursor import decode_cursor, encode_cursor
from sidecar.review.events import CREATED, RESOLVED, event_body, new_event_id
from sidecar.review.store import (
    Decision,
    EnqueueResult,
    NewReview,
    OutboxEvent,
    Resolution,
    ReviewConflict,
    ReviewItem,
    ReviewNotFound,
    ReviewPage,
    ReviewQuery,
    ReviewStatus,
    ReviewStoreError,
)

if TYPE_CHECKING:
    from sidecar.database import Connection

__all__ = ["COMPONENT", "MIGRATIONS", "PostgresReviewStore"]

COMPONENT = "reviews"
_PURGE_EVERY = 3600.0

MIGRATIONS = (
    Migration(
        1,
        "review items",
        """
        CREATE TABLE IF NOT EXISTS reviews (
            id          TEXT PRIMARY KEY,
            request_id  TEXT NOT NULL UNIQUE,
            trace_id    TEXT NOT NULL,
            route       TEXT NOT NULL,
            reason      TEXT NOT NULL,
            action      TEXT NOT NULL,
            confidence  DOUBLE PRECISION,
            request     JSONB NOT NULL,
            answer      JSONB NOT NULL,
            status      TEXT NOT NULL DEFAULT 'pending',
            created_at  DOUBLE PRECISION NOT NULL,
            claimed_by  TEXT,
            lease_until DOUBLE PRECISION,
            decision    TEXT,
            reviewer    TEXT,
            note        TEXT,
            corrected   JSONB,
            resolved_at DOUBLE PRECISION
        );
        CREATE INDEX IF NOT EXISTS reviews_created ON reviews (created_at, id);
        CREATE INDEX IF NOT EXISTS reviews_route_created ON reviews (route, created_at, id);
        CREATE INDEX IF NOT EXISTS reviews_open ON reviews (created_at, id)
            WHERE status <> 'resolved';
        """,
    ),
    Migration(
        2,
        "webhook outbox",
        """
        CREATE TABLE IF NOT EXISTS review_outbox (
            seq             BIGSERIAL PRIMARY KEY,
            id              TEXT NOT NULL UNIQUE,
            kind            TEXT NOT NULL,
            review_id       TEXT NOT NULL,
            payload         TEXT NOT NULL,
            created_at      DOUBLE PRECISION NOT NULL,
            attempts        INTEGER NOT NULL DEFAULT 0,
            next_attempt_at DOUBLE PRECISION NOT NULL,
            last_error      TEXT
        );
        CREATE INDEX IF NOT EXISTS review_outbox_due ON review_outbox (next_attempt_at, seq);
        """,
    ),
    Migration(
        3,
        "shared keys (status URL capability)",
        """
        CREATE TABLE IF NOT EXISTS sidecar_keys (
            name   TEXT PRIMARY KEY,
            secret BYTEA NOT NULL
        );
        """,
    ),
)

_CAPABILITY_KEY = "review-status-url"
# A claim whose lease ran out reads as pending again.
_OPEN = "(status = 'pending' OR (status = 'claimed' AND lease_until <= %(now)s))"
_EFFECTIVE_STATUS = (
    "CASE WHEN status = 'claimed' AND lease_until <= %(now)s THEN 'pending' ELSE status END"
)


class PostgresReviewStore:
    """`ReviewStore` on PostgreSQL (`SIDECAR_DATABASE_URL`), tables in `schema` when given."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        clock: Clock | None = None,
        retention: float = 30 * 86400.0,
        outbox_limit: int | None = None,
        pool_size: int = 10,
        timeout: float = 3.0,
    ) -> None:
        self.db = Database(
            url, schema=schema, max_size=pool_size, timeout=timeout, name="sidecar-reviews"
        )
        self.clock = clock or MonotonicClock()
        self.retention = retention
        self.outbox_limit = outbox_limit
        self.outbox_dropped = 0
        self._migrated = False
        self._last_purge: float | None = None

    # --- plumbing ------------------------------------------------------------------------

    def _error(self, exc: DatabaseError) -> ReviewStoreError:
        return ReviewStoreError(f"review store: {exc}")

    async def migrate(self) -> list[int]:
        """Apply pending migrations (idempotent; safe with several replicas starting)."""
        try:
            applied = await self.db.migrate(COMPONENT, MIGRATIONS)
        except DatabaseError as exc:
            raise self._error(exc) from exc
        self._migrated = True
        return applied

    async def _ready(self) -> None:
        if not self._migrated:
            await self.migrate()

    def _item(self, row: dict[str, Any], now: float) -> ReviewItem:
        status = ReviewStatus(row["status"])
        lease_until = row["lease_until"]
        claimed_by = row["claimed_by"]
        if status is ReviewStatus.CLAIMED and (lease_until is None or lease_until <= now):
            status, claimed_by, lease_until = ReviewStatus.PENDING, None, None
        return ReviewItem(
            id=row["id"],
            request_id=row["request_id"],
            trace_id=row["trace_id"],
            route=row["route"],
            reason=row["reason"],
            action=row["action"],
            confidence=row["confidence"],
            request=row["request"],
            answer=row["answer"],
            status=status,
            created_at=row["created_at"],
            claimed_by=claimed_by,
            lease_until=lease_until,
            decision=Decision(row["decision"]) if row["decision"] else None,
            reviewer=row["reviewer"],
            note=row["note"],
            corrected=row["corrected"],
            resolved_at=row["resolved_at"],
        )

    @staticmethod
    async def _one(conn: Connection, sql: str, params: Any = None) -> dict[str, Any] | None:
        cursor = await conn.execute(sql, params)
        return await cursor.fetchone()

    # --- the protocol --------------------------------------------------------------------

    async def enqueue(self, review: NewReview) -> EnqueueResult:
        await self._ready()
        now = self.clock.wall()
        try:
            async with self.db.connection() as conn:
                async with conn.transaction():
                    row = await self._one(
                        conn,
                        "INSERT INTO reviews (id, request_id, trace_id, route, reason, action,"
                        " confidence, request, answer, status, created_at)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'pending', %s)"
                        " ON CONFLICT (request_id) DO NOTHING RETURNING *",
                        (
                            secrets.token_hex(16),
                            review.request_id,
                            review.trace_id,
                            review.route,
                            review.reason,
                            review.action,
                            review.confidence,
                            Jsonb(review.request),
                            Jsonb(review.answer),
                            now,
                        ),
                    )
                    created = row is not None
                    if row is None:
                        row = await self._one(
                            conn,
                            "SELECT * FROM reviews WHERE request_id = %s",
                            (review.request_id,),
                        )
                        assert row is not None
                    item = self._item(row, now)
                    if created:
                        await self._add_event(conn, CREATED, item, now)
        except DatabaseError as exc:
            raise self._error(exc) from exc
        # Said only now: the transaction above committed.
        await self._maybe_purge(now)
        return EnqueueResult(item=item, created=created)

    async def _maybe_purge(self, now: float) -> None:
        """Retention, at most hourly, best effort: the item is already committed, so a failing
        purge must not make the caller believe it was not."""
        if self._last_purge is not None and now - self._last_purge < _PURGE_EVERY:
            return
        self._last_purge = now
        with contextlib.suppress(DatabaseError):
            async with self.db.connection() as conn:
                await self._purge(conn, now - self.retention)

    @staticmethod
    async def _purge(conn: Connection, cutoff: float) -> int:
        cursor = await conn.execute(
            "DELETE FROM reviews WHERE status = 'resolved' AND resolved_at < %s", (cutoff,)
        )
        return cursor.rowcount

    async def get(self, review_id: str) -> ReviewItem | None:
        await self._ready()
        now = self.clock.wall()
        try:
            async with self.db.connection() as conn:
                row = await self._one(conn, "SELECT * FROM reviews WHERE id = %s", (review_id,))
        except DatabaseError as exc:
            raise self._error(exc) from exc
        return None if row is None else self._item(row, now)

    async def list(self, query: ReviewQuery) -> ReviewPage:
        now = self.clock.wall()
        where = ["TRUE"]
        params: dict[str, Any] = {"now": now, "limit": query.limit + 1}
        if query.route is not None:
            where.append("route = %(route)s")
            params["route"] = query.route
        if query.status is not None:
            where.append(f"({_EFFECTIVE_STATUS}) = %(status)s")
            params["status"] = query.status.value
        if query.min_age is not None:
            where.append("created_at <= %(oldest)s")
            params["oldest"] = now - query.min_age
        if query.max_age is not None:
            where.append("created_at >= %(newest)s")
            params["newest"] = now - query.max_age
        if query.cursor is not None:
            after_time, after_id = decode_cursor(query.cursor)
            where.append("(created_at, id) > (%(after_time)s, %(after_id)s)")
            params["after_time"] = after_time
            params["after_id"] = after_id
        sql = (
            "SELECT * FROM reviews WHERE "
            + " AND ".join(where)
            + " ORDER BY created_at, id LIMIT %(limit)s"
        )
        await self._ready()
        try:
            async with self.db.connection() as conn:
                cursor = await conn.execute(sql, params)
                rows = await cursor.fetchall()
        except DatabaseError as exc:
            raise self._error(exc) from exc
        items = [self._item(row, now) for row in rows[: query.limit]]
        more = len(rows) > query.limit
        next_cursor = encode_cursor(items[-1].created_at, items[-1].id) if more else None
        return ReviewPage(items=items, next_cursor=next_cursor)

    async def claim(self, review_id: str, reviewer: str, lease: float) -> ReviewItem:
        await self._ready()
        now = self.clock.wall()
        try:
            async with self.db.connection() as conn, conn.transaction():
                row = await self._one(
                    conn,
                    "SELECT * FROM reviews WHERE id = %s FOR UPDATE SKIP LOCKED",
                    (review_id,),
                )
                if row is None:
                    exists = await self._one(
                        conn, "SELECT 1 AS one FROM reviews WHERE id = %s", (review_id,)
                    )
                    if exists is None:
                        raise ReviewNotFound(f"no review {review_id}")
                    raise ReviewConflict(
                        f"review {review_id} is being claimed or resolved by someone else"
                    )
                self._check(self._item(row, now), reviewer)
                row = await self._one(
                    conn,
                    "UPDATE reviews SET status = 'claimed', claimed_by = %s, lease_until = %s"
                    " WHERE id = %s RETURNING *",
                    (reviewer, now + lease, review_id),
                )
                assert row is not None
        except DatabaseError as exc:
            raise self._error(exc) from exc
        return self._item(row, now)

    @staticmethod
    def _check(current: ReviewItem, reviewer: str) -> None:
        if current.status is ReviewStatus.RESOLVED:
            raise ReviewConflict(
                f"review {current.id} was already resolved ({current.decision}) "
                f"by {current.reviewer}"
            )
        if current.status is ReviewStatus.CLAIMED and current.claimed_by != reviewer:
            raise ReviewConflict(
                f"review {current.id} is claimed by {current.claimed_by} until its lease expires"
            )

    async def claim_next(
        self, reviewer: str, lease: float, route: str | None = None
    ) -> ReviewItem | None:
        await self._ready()
        now = self.clock.wall()
        params: dict[str, Any] = {"now": now, "reviewer": reviewer, "until": now + lease}
        where = _OPEN
        if route is not None:
            where += " AND route = %(route)s"
            params["route"] = route
        try:
            async with self.db.connection() as conn, conn.transaction():
                row = await self._one(
                    conn,
                    "UPDATE reviews SET status = 'claimed', claimed_by = %(reviewer)s,"
                    " lease_until = %(until)s WHERE id = ("
                    f" SELECT id FROM reviews WHERE {where}"
                    " ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED"
                    ") RETURNING *",
                    params,
                )
        except DatabaseError as exc:
            raise self._error(exc) from exc
        return None if row is None else self._item(row, now)

    async def resolve(self, review_id: str, resolution: Resolution) -> ReviewItem:
        await self._ready()
        now = self.clock.wall()
        corrected = (
            Jsonb(resolution.corrected) if resolution.decision is Decision.OVERRIDE else None
        )
        try:
            async with self.db.connection() as conn, conn.transaction():
                # Waits for a concurrent claim or resolve, then decides on what it committed.
                row = await self._one(
                    conn, "SELECT * FROM reviews WHERE id = %s FOR UPDATE", (review_id,)
                )
                if row is None:
                    raise ReviewNotFound(f"no review {review_id}")
                self._check(self._item(row, now), resolution.reviewer)
                row = await self._one(
                    conn,
                    "UPDATE reviews SET status = 'resolved', decision = %s, reviewer = %s,"
                    " note = %s, corrected = %s, resolved_at = %s, claimed_by = NULL,"
                    " lease_until = NULL WHERE id = %s RETURNING *",
                    (
                        resolution.decision.value,
                        resolution.reviewer,
                        resolution.note,
                        corrected,
                        now,
                        review_id,
                    ),
                )
                assert row is not None
                item = self._item(row, now)
                await self._add_event(conn, RESOLVED, item, now)
        except DatabaseError as exc:
            raise self._error(exc) from exc
        return item

    async def backlog(self) -> tuple[int, float | None]:
        await self._ready()
        try:
            async with self.db.connection() as conn:
                row = await self._one(
                    conn,
                    "SELECT count(*) AS n, min(created_at) AS oldest FROM reviews"
                    " WHERE status <> 'resolved'",
                )
        except DatabaseError as exc:
            raise self._error(exc) from exc
        assert row is not None
        return int(row["n"]), row["oldest"]

    async def purge(self, older_than: float) -> int:
        await self._ready()
        cutoff = self.clock.wall() - older_than
        try:
            async with self.db.connection() as conn:
                return await self._purge(conn, cutoff)
        except DatabaseError as exc:
            raise self._error(exc) from exc

    async def capability_secret(self) -> bytes | None:
        """One key for every replica: the first to ask creates it, the rest read it."""
        await self._ready()
        try:
            async with self.db.connection() as conn:
                await conn.execute(
                    "INSERT INTO sidecar_keys (name, secret) VALUES (%s, %s)"
                    " ON CONFLICT (name) DO NOTHING",
                    (_CAPABILITY_KEY, secrets.token_bytes(32)),
                )
                row = await self._one(
                    conn, "SELECT secret FROM sidecar_keys WHERE name = %s", (_CAPABILITY_KEY,)
                )
        except DatabaseError as exc:
            raise self._error(exc) from exc
        assert row is not None
        return bytes(row["secret"])

    # --- the webhook outbox --------------------------------------------------------------

    async def _add_event(self, conn: Connection, kind: str, item: ReviewItem, now: float) -> None:
        """Inside the caller's transaction: the event commits with the change it reports."""
        if self.outbox_limit is None:
            return
        event_id = new_event_id()
        await conn.execute(
            "INSERT INTO review_outbox (id, kind, review_id, payload, created_at,"
            " next_attempt_at) VALUES (%s, %s, %s, %s, %s, %s)",
            (event_id, kind, item.id, event_body(event_id, kind, item, now), now, now),
        )
        row = await self._one(conn, "SELECT count(*) AS n FROM review_outbox")
        assert row is not None
        excess = int(row["n"]) - self.outbox_limit
        if excess > 0:
            cursor = await conn.execute(
                "DELETE FROM review_outbox WHERE seq IN"
                " (SELECT seq FROM review_outbox ORDER BY seq LIMIT %s)",
                (excess,),
            )
            self.outbox_dropped += cursor.rowcount

    @staticmethod
    def _event(row: dict[str, Any]) -> OutboxEvent:
        return OutboxEvent(
            id=row["id"],
            kind=row["kind"],
            review_id=row["review_id"],
            payload=row["payload"],
            created_at=row["created_at"],
            attempts=row["attempts"],
            next_attempt_at=row["next_attempt_at"],
            last_error=row["last_error"],
        )

    async def outbox_take(self, now: float, limit: int, lease: float) -> Sequence[OutboxEvent]:
        await self._ready()
        try:
            async with self.db.connection() as conn:
                cursor = await conn.execute(
                    "UPDATE review_outbox SET next_attempt_at = %s WHERE seq IN ("
                    " SELECT seq FROM review_outbox WHERE next_attempt_at <= %s"
                    " ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING *",
                    (now + lease, now, limit),
                )
                rows = await cursor.fetchall()
        except DatabaseError as exc:
            raise self._error(exc) from exc
        # RETURNING has no order of its own.
        return [self._event(row) for row in sorted(rows, key=lambda r: int(r["seq"]))]

    async def _write(self, sql: str, params: Any) -> int:
        await self._ready()
        try:
            async with self.db.connection() as conn:
                cursor = await conn.execute(sql, params)
                return cursor.rowcount
        except DatabaseError as exc:
            raise self._error(exc) from exc

    async def outbox_delivered(self, event_id: str) -> None:
        await self._write("DELETE FROM review_outbox WHERE id = %s", (event_id,))

    async def outbox_retry(self, event_id: str, next_attempt_at: float, error: str) -> None:
        await self._write(
            "UPDATE review_outbox SET attempts = attempts + 1, next_attempt_at = %s,"
            " last_error = %s WHERE id = %s",
            (next_attempt_at, error[:500], event_id),
        )

    async def outbox_expire(self, created_before: float) -> int:
        return await self._write(
            "DELETE FROM review_outbox WHERE created_at < %s", (created_before,)
        )

    async def outbox_size(self) -> int:
        await self._ready()
        try:
            async with self.db.connection() as conn:
                row = await self._one(conn, "SELECT count(*) AS n FROM review_outbox")
        except DatabaseError as exc:
            raise self._error(exc) from exc
        assert row is not None
        return int(row["n"])

    async def close(self) -> None:
        await self.db.close()
