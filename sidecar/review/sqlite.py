"""The embedded review store: one SQLite file in WAL mode with `synchronous=FULL`.

`synchronous=FULL` makes every commit fsync the write-ahead log, so an item the store says it
queued survives a crash or power loss the moment `enqueue` returns; WAL lets readers (the review
API) run while the gate writes. All SQLite calls run on one dedicated worker thread, never on the
event loop, and that thread owns the only connection, so writes are serialised without locks of
our own. The file is opened lazily: a store whose directory is missing or unwritable raises
`ReviewStoreError` on use (the gate then fails closed) and tries again on the next call.

With `outbox_limit`, webhook events are written to `review_outbox` in the transaction of the
change they report (`sidecar.review.webhooks` delivers them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sidecar.clock import Clock, MonotonicClock
from sidecar.review.cursor import CURSOR_PATTERN, decode_cursor, encode_cursor
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
from sidecar.sqlite_wal import open_wal_database

__all__ = ["CURSOR_PATTERN", "DB_NAME", "SqliteReviewStore"]

DB_NAME = "reviews.db"
_SCHEMA_VERSION = 2
_PURGE_EVERY = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    id          TEXT PRIMARY KEY,
    request_id  TEXT NOT NULL UNIQUE,
    trace_id    TEXT NOT NULL,
    route       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    action      TEXT NOT NULL,
    confidence  REAL,
    request     TEXT NOT NULL,
    answer      TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'pending',
    created_at  REAL NOT NULL,
    claimed_by  TEXT,
    lease_until REAL,
    decision    TEXT,
    reviewer    TEXT,
    note        TEXT,
    corrected   TEXT,
    resolved_at REAL
);
CREATE INDEX IF NOT EXISTS reviews_status_created ON reviews (status, created_at, id);
CREATE INDEX IF NOT EXISTS reviews_route_created ON reviews (route, created_at, id);
CREATE TABLE IF NOT EXISTS review_outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    kind            TEXT NOT NULL,
    review_id       TEXT NOT NULL,
    payload         TEXT NOT NULL,
    created_at      REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT
);
CREATE INDEX IF NOT EXISTS review_outbox_due ON review_outbox (next_attempt_at, seq);
"""

# A claim whose lease ran out reads as pending again.
_EFFECTIVE_STATUS = (
    "CASE WHEN status = 'claimed' AND lease_until <= :now THEN 'pending' ELSE status END"
)

T = TypeVar("T")


class SqliteReviewStore:
    """`ReviewStore` on a SQLite file (`<state dir>/reviews.db` by default)."""

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Clock | None = None,
        retention: float = 30 * 86400.0,
        outbox_limit: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.clock = clock or MonotonicClock()
        self.retention = retention
        self.outbox_limit = outbox_limit
        self.outbox_dropped = 0
        self._conn: sqlite3.Connection | None = None
        self._last_purge: float | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sidecar-reviews"
        )

    # --- the worker thread ---------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            conn = self._connect()
            try:
                return fn(conn)
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
        except (ReviewConflict, ReviewNotFound, ValueError):
            raise
        except sqlite3.Error as exc:
            # Reopen next time: the file may have been fixed (or replaced) meanwhile.
            self._drop_connection()
            raise ReviewStoreError(f"review store {self.path}: {exc}") from exc
        except OSError as exc:
            self._drop_connection()
            raise ReviewStoreError(f"review store {self.path}: {exc.strerror or exc}") from exc

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        conn = open_wal_database(
            self.path, synchronous="FULL", schema=_SCHEMA, schema_version=_SCHEMA_VERSION
        )
        self._conn = conn
        return conn

    # --- rows ----------------------------------------------------------------------------

    def _item(self, row: sqlite3.Row, now: float) -> ReviewItem:
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
            request=json.loads(row["request"]),
            answer=json.loads(row["answer"]),
            status=status,
            created_at=row["created_at"],
            claimed_by=claimed_by,
            lease_until=lease_until,
            decision=Decision(row["decision"]) if row["decision"] else None,
            reviewer=row["reviewer"],
            note=row["note"],
            corrected=json.loads(row["corrected"]) if row["corrected"] is not None else None,
            resolved_at=row["resolved_at"],
        )

    @staticmethod
    def _row(conn: sqlite3.Connection, review_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = conn.execute(
            "SELECT * FROM reviews WHERE id = ?", (review_id,)
        ).fetchone()
        return row

    # --- the protocol --------------------------------------------------------------------

    async def enqueue(self, review: NewReview) -> EnqueueResult:
        now = self.clock.wall()

        def work(conn: sqlite3.Connection) -> EnqueueResult:
            conn.execute("BEGIN IMMEDIATE")
            cursor = conn.execute(
                "INSERT INTO reviews (id, request_id, trace_id, route, reason, action,"
                " confidence, request, answer, status, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)"
                " ON CONFLICT(request_id) DO NOTHING",
                (
                    secrets.token_hex(16),
                    review.request_id,
                    review.trace_id,
                    review.route,
                    review.reason,
                    review.action,
                    review.confidence,
                    json.dumps(review.request),
                    json.dumps(review.answer),
                    now,
                ),
            )
            created = cursor.rowcount == 1
            row = conn.execute(
                "SELECT * FROM reviews WHERE request_id = ?", (review.request_id,)
            ).fetchone()
            if created:
                self._add_event(conn, CREATED, self._item(row, now), now)
            conn.execute("COMMIT")
            # Said only now: the commit above fsynced the log (synchronous=FULL).
            result = EnqueueResult(item=self._item(row, now), created=created)
            self._maybe_purge(conn, now)
            return result

        return await self._run(work)

    def _maybe_purge(self, conn: sqlite3.Connection, now: float) -> None:
        if self._last_purge is not None and now - self._last_purge < _PURGE_EVERY:
            return
        self._last_purge = now
        self._purge(conn, now - self.retention)

    @staticmethod
    def _purge(conn: sqlite3.Connection, cutoff: float) -> int:
        cursor = conn.execute(
            "DELETE FROM reviews WHERE status = 'resolved' AND resolved_at < ?", (cutoff,)
        )
        return cursor.rowcount

    async def get(self, review_id: str) -> ReviewItem | None:
        now = self.clock.wall()

        def work(conn: sqlite3.Connection) -> ReviewItem | None:
            row = self._row(conn, review_id)
            return None if row is None else self._item(row, now)

        return await self._run(work)

    async def list(self, query: ReviewQuery) -> ReviewPage:
        now = self.clock.wall()
        where = ["1 = 1"]
        params: dict[str, Any] = {"now": now, "limit": query.limit + 1}
        if query.route is not None:
            where.append("route = :route")
            params["route"] = query.route
        if query.status is not None:
            where.append(f"({_EFFECTIVE_STATUS}) = :status")
            params["status"] = query.status.value
        if query.min_age is not None:
            where.append("created_at <= :oldest")
            params["oldest"] = now - query.min_age
        if query.max_age is not None:
            where.append("created_at >= :newest")
            params["newest"] = now - query.max_age
        if query.cursor is not None:
            after_time, after_id = decode_cursor(query.cursor)
            where.append("(created_at, id) > (:after_time, :after_id)")
            params["after_time"] = after_time
            params["after_id"] = after_id
        sql = (
            "SELECT * FROM reviews WHERE "
            + " AND ".join(where)
            + " ORDER BY created_at, id LIMIT :limit"
        )

        def work(conn: sqlite3.Connection) -> ReviewPage:
            rows = conn.execute(sql, params).fetchall()
            items = [self._item(row, now) for row in rows[: query.limit]]
            more = len(rows) > query.limit
            cursor = encode_cursor(items[-1].created_at, items[-1].id) if more else None
            return ReviewPage(items=items, next_cursor=cursor)

        return await self._run(work)

    async def claim(self, review_id: str, reviewer: str, lease: float) -> ReviewItem:
        now = self.clock.wall()

        def work(conn: sqlite3.Connection) -> ReviewItem:
            conn.execute("BEGIN IMMEDIATE")
            current = self._checked(conn, review_id, reviewer, now)
            if current.status is ReviewStatus.RESOLVED:
                raise ReviewConflict(f"review {review_id} is already resolved")
            conn.execute(
                "UPDATE reviews SET status = 'claimed', claimed_by = ?, lease_until = ?"
                " WHERE id = ?",
                (reviewer, now + lease, review_id),
            )
            row = self._row(conn, review_id)
            conn.execute("COMMIT")
            assert row is not None
            return self._item(row, now)

        return await self._run(work)

    async def claim_next(
        self, reviewer: str, lease: float, route: str | None = None
    ) -> ReviewItem | None:
        now = self.clock.wall()
        where = f"({_EFFECTIVE_STATUS}) = 'pending'"
        params: dict[str, Any] = {"now": now}
        if route is not None:
            where += " AND route = :route"
            params["route"] = route

        def work(conn: sqlite3.Connection) -> ReviewItem | None:
            # BEGIN IMMEDIATE takes the write lock: concurrent callers are serialised.
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                f"SELECT id FROM reviews WHERE {where} ORDER BY created_at, id LIMIT 1", params
            ).fetchone()
            if row is None:
                conn.execute("COMMIT")
                return None
            conn.execute(
                "UPDATE reviews SET status = 'claimed', claimed_by = ?, lease_until = ?"
                " WHERE id = ?",
                (reviewer, now + lease, row["id"]),
            )
            claimed = self._row(conn, row["id"])
            conn.execute("COMMIT")
            assert claimed is not None
            return self._item(claimed, now)

        return await self._run(work)

    def _checked(
        self, conn: sqlite3.Connection, review_id: str, reviewer: str, now: float
    ) -> ReviewItem:
        row = self._row(conn, review_id)
        if row is None:
            raise ReviewNotFound(f"no review {review_id}")
        current = self._item(row, now)
        if current.status is ReviewStatus.CLAIMED and current.claimed_by != reviewer:
            raise ReviewConflict(
                f"review {review_id} is claimed by {current.claimed_by} until its lease expires"
            )
        return current

    async def resolve(self, review_id: str, resolution: Resolution) -> ReviewItem:
        now = self.clock.wall()
        corrected = (
            json.dumps(resolution.corrected) if resolution.decision is Decision.OVERRIDE else None
        )

        def work(conn: sqlite3.Connection) -> ReviewItem:
            conn.execute("BEGIN IMMEDIATE")
            current = self._checked(conn, review_id, resolution.reviewer, now)
            if current.status is ReviewStatus.RESOLVED:
                raise ReviewConflict(
                    f"review {review_id} was already resolved ({current.decision}) "
                    f"by {current.reviewer}"
                )
            conn.execute(
                "UPDATE reviews SET status = 'resolved', decision = ?, reviewer = ?, note = ?,"
                " corrected = ?, resolved_at = ?, claimed_by = NULL, lease_until = NULL"
                " WHERE id = ?",
                (
                    resolution.decision.value,
                    resolution.reviewer,
                    resolution.note,
                    corrected,
                    now,
                    review_id,
                ),
            )
            row = self._row(conn, review_id)
            assert row is not None
            item = self._item(row, now)
            self._add_event(conn, RESOLVED, item, now)
            conn.execute("COMMIT")
            return item

        return await self._run(work)

    async def backlog(self) -> tuple[int, float | None]:
        def work(conn: sqlite3.Connection) -> tuple[int, float | None]:
            row = conn.execute(
                "SELECT count(*), min(created_at) FROM reviews WHERE status != 'resolved'"
            ).fetchone()
            return int(row[0]), row[1]

        return await self._run(work)

    async def purge(self, older_than: float) -> int:
        cutoff = self.clock.wall() - older_than

        def work(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            count = self._purge(conn, cutoff)
            conn.execute("COMMIT")
            return count

        return await self._run(work)

    async def capability_secret(self) -> bytes | None:
        return None  # one replica: the state directory keeps it (`status-url.key`)

    # --- the webhook outbox --------------------------------------------------------------

    def _add_event(self, conn: sqlite3.Connection, kind: str, item: ReviewItem, now: float) -> None:
        """Inside the caller's transaction: the event commits with the change it reports."""
        if self.outbox_limit is None:
            return
        event_id = new_event_id()
        conn.execute(
            "INSERT INTO review_outbox (id, kind, review_id, payload, created_at, next_attempt_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (event_id, kind, item.id, event_body(event_id, kind, item, now), now, now),
        )
        count = conn.execute("SELECT count(*) FROM review_outbox").fetchone()[0]
        excess = int(count) - self.outbox_limit
        if excess > 0:
            conn.execute(
                "DELETE FROM review_outbox WHERE seq IN"
                " (SELECT seq FROM review_outbox ORDER BY seq LIMIT ?)",
                (excess,),
            )
            self.outbox_dropped += excess

    @staticmethod
    def _event(row: sqlite3.Row) -> OutboxEvent:
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
        def work(conn: sqlite3.Connection) -> Sequence[OutboxEvent]:
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(
                "SELECT * FROM review_outbox WHERE next_attempt_at <= ? ORDER BY seq LIMIT ?",
                (now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE review_outbox SET next_attempt_at = ? WHERE seq = ?",
                [(now + lease, row["seq"]) for row in rows],
            )
            conn.execute("COMMIT")
            return [self._event(row) for row in rows]

        return await self._run(work)

    async def outbox_delivered(self, event_id: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM review_outbox WHERE id = ?", (event_id,))

        await self._run(work)

    async def outbox_retry(self, event_id: str, next_attempt_at: float, error: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE review_outbox SET attempts = attempts + 1, next_attempt_at = ?,"
                " last_error = ? WHERE id = ?",
                (next_attempt_at, error[:500], event_id),
            )

        await self._run(work)

    async def outbox_expire(self, created_before: float) -> int:
        def work(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "DELETE FROM review_outbox WHERE created_at < ?", (created_before,)
            )
            return cursor.rowcount

        return await self._run(work)

    async def outbox_size(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT count(*) FROM review_outbox").fetchone()[0])

        return await self._run(work)

    async def pragmas(self) -> dict[str, Any]:
        """The settings durability relies on, as the store's own connection sees them."""

        def work(conn: sqlite3.Connection) -> dict[str, Any]:
            return {
                "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
                "synchronous": conn.execute("PRAGMA synchronous").fetchone()[0],
            }

        return await self._run(work)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._drop_connection)
        self._executor.shutdown(wait=True)
