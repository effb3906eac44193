"""The shared failure store: PostgreSQL, for several replicas recording into one place.

Same contract as the SQLite store (`sidecar.failures.store`): `write` commits records and
per-minute request counts in one transaction (counts from several replicas add up through an
upsert), `list` pages in (time, id) order, `purge` applies the retention. Migrations run on first
use (and with `sidecar migrate`); a database that cannot be reached raises `FailureStoreError`
naming the server without its password. Records arrive already redacted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from psycopg.types.json import Jsonb

from sidecar.database import Database, DatabaseError, Migration
from sidecar.failures.store import (
    RECORD_COLUMNS,
    FailurePage,
    FailureQuery,
    FailureRecord,
    FailureStoreError,
    RequestCount,
    decode_cursor,
    encode_cursor,
    record_from_row,
    record_values,
)

__all__ = ["COMPONENT", "MIGRATIONS", "PostgresFailureStore"]

COMPONENT = "failures"

_COLUMNS = RECORD_COLUMNS

MIGRATIONS = (
    Migration(
        1,
        "failure records and request counts",
        """
        CREATE TABLE IF NOT EXISTS failures (
            id                     TEXT PRIMARY KEY,
            time                   DOUBLE PRECISION NOT NULL,
            kind                   TEXT NOT NULL,
            route                  TEXT NOT NULL,
            upstream               TEXT NOT NULL,
            mode                   TEXT,
            outcome                TEXT NOT NULL,
            request_id             TEXT NOT NULL,
            trace_id               TEXT NOT NULL,
            status                 INTEGER,
            attempts               INTEGER NOT NULL,
            retries                INTEGER NOT NULL,
            latency_ms             DOUBLE PRECISION,
            upstream_ms            DOUBLE PRECISION,
            breaker_state          TEXT,
            confidence             DOUBLE PRECISION,
            confidence_band        TEXT,
            retry_budget_exhausted BOOLEAN NOT NULL,
            fallback_kind          TEXT,
            review_id              TEXT,
            upstream_status        INTEGER,
            method                 TEXT NOT NULL,
            path                   TEXT NOT NULL,
            cause                  TEXT,
            request_excerpt        TEXT,
            response_excerpt       TEXT,
            note                   TEXT,
            detail                 JSONB NOT NULL
        );
        CREATE INDEX IF NOT EXISTS failures_time ON failures (time, id);
        CREATE INDEX IF NOT EXISTS failures_request ON failures (request_id, time);
        CREATE TABLE IF NOT EXISTS request_counts (
            minute  BIGINT NOT NULL,
            route   TEXT NOT NULL,
            outcome TEXT NOT NULL,
            count   BIGINT NOT NULL,
            PRIMARY KEY (minute, route, outcome)
        );
        """,
    ),
)

_INSERT = (
    f"INSERT INTO failures ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('%s' for _ in _COLUMNS)}) ON CONFLICT (id) DO NOTHING"
)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


class PostgresFailureStore:
    """`FailureStore` on PostgreSQL, tables in `schema` when given."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        pool_size: int = 4,
        timeout: float = 3.0,
    ) -> None:
        self.db = Database(
            url, schema=schema, max_size=pool_size, timeout=timeout, name="sidecar-failures"
        )
        self._migrated = False

    def _error(self, exc: DatabaseError) -> FailureStoreError:
        return FailureStoreError(f"failure store: {exc}")

    async def migrate(self) -> list[int]:
        try:
            applied = await self.db.migrate(COMPONENT, MIGRATIONS)
        except DatabaseError as exc:
            raise self._error(exc) from exc
        self._migrated = True
        return applied

    async def _ready(self) -> None:
        if not self._migrated:
            await self.migrate()

    async def write(self, records: Sequence[FailureRecord], counts: Sequence[RequestCount]) -> None:
        rows = [_row_values(r) for r in records]
        count_rows = [(c.minute, c.route, c.outcome, c.count) for c in counts]
        if not rows and not count_rows:
            return
        await self._ready()
        try:
            async with self.db.connection() as conn, conn.transaction():
                async with conn.cursor() as cursor:
                    if rows:
                        await cursor.executemany(_INSERT, rows)
                    if count_rows:
                        await cursor.executemany(
                            "INSERT INTO request_counts (minute, route, outcome, count)"
                            " VALUES (%s, %s, %s, %s) ON CONFLICT (minute, route, outcome)"
                            " DO UPDATE SET count = request_counts.count + excluded.count",
                            count_rows,
                        )
        except DatabaseError as exc:
            raise self._error(exc) from exc

    async def list(self, query: FailureQuery) -> FailurePage:
        where = ["TRUE"]
        params: dict[str, Any] = {"limit": query.limit + 1}
        if query.since is not None:
            where.append("time >= %(since)s")
            params["since"] = query.since
        if query.until is not None:
            where.append("time < %(until)s")
            params["until"] = query.until
        if query.route is not None:
            where.append("route = %(route)s")
            params["route"] = query.route
        if query.request_id is not None:
            where.append("request_id = %(request_id)s")
            params["request_id"] = query.request_id
        if query.kinds is not None:
            where.append("kind = ANY(%(kinds)s)")
            params["kinds"] = [k.value for k in query.kinds]
        if query.modes is not None:
            where.append("mode = ANY(%(modes)s)")
            params["modes"] = list(query.modes)
        order = "DESC" if query.newest_first else "ASC"
        if query.cursor is not None:
            after_time, after_id = decode_cursor(query.cursor)
            where.append(f"(time, id) {'<' if query.newest_first else '>'} (%(at)s, %(aid)s)")
            params["at"] = after_time
            params["aid"] = after_id
        sql = (
            "SELECT * FROM failures WHERE "
            + " AND ".join(where)
            + f" ORDER BY time {order}, id {order} LIMIT %(limit)s"
        )
        await self._ready()
        try:
            async with self.db.connection() as conn:
                cursor = await conn.execute(sql, params)
                rows = await cursor.fetchall()
        except DatabaseError as exc:
            raise self._error(exc) from exc
        records = [_record(row) for row in rows[: query.limit]]
        more = len(rows) > query.limit
        return FailurePage(
            records=records, next_cursor=encode_cursor(records[-1]) if more else None
        )

    async def request_counts(
        self, since: float | None, until: float | None, route: str | None = None
    ) -> Sequence[RequestCount]:
        where = ["TRUE"]
        params: dict[str, Any] = {}
        if since is not None:
            where.append("minute >= %(since)s")
            params["since"] = since
        if until is not None:
            where.append("minute < %(until)s")
            params["until"] = until
        if route is not None:
            where.append("route = %(route)s")
            params["route"] = route
        sql = (
            "SELECT minute, route, outcome, count FROM request_counts WHERE "
            + " AND ".join(where)
            + " ORDER BY minute, route, outcome"
        )
        await self._ready()
        try:
            async with self.db.connection() as conn:
                cursor = await conn.execute(sql, params)
                rows = await cursor.fetchall()
        except DatabaseError as exc:
            raise self._error(exc) from exc
        return [
            RequestCount(
                minute=int(r["minute"]),
                route=r["route"],
                outcome=r["outcome"],
                count=int(r["count"]),
            )
            for r in rows
        ]

    async def purge(self, now: float, max_age: float, max_rows: int | None) -> int:
        cutoff = now - max_age
        await self._ready()
        try:
            async with self.db.connection() as conn, conn.transaction():
                cursor = await conn.execute("DELETE FROM failures WHERE time < %s", (cutoff,))
                deleted = cursor.rowcount
                await conn.execute(
                    "DELETE FROM request_counts WHERE minute < %s", (int(cutoff // 60) * 60,)
                )
                if max_rows is not None:
                    cursor = await conn.execute(
                        "DELETE FROM failures WHERE id IN (SELECT id FROM failures"
                        " ORDER BY time, id LIMIT GREATEST(0, (SELECT count(*) FROM failures)"
                        " - %s))",
                        (max_rows,),
                    )
                    deleted += cursor.rowcount
        except DatabaseError as exc:
            raise self._error(exc) from exc
        return int(deleted)

    async def close(self) -> None:
        await self.db.close()


def _row_values(record: FailureRecord) -> tuple[Any, ...]:
    return record_values(record, flag=bool, detail=lambda d: Jsonb(d, dumps=_dumps))


def _record(row: dict[str, Any]) -> FailureRecord:
    return record_from_row(row, detail=lambda d: d)
