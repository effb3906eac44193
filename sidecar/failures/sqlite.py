"""The embedded failure store: one SQLite file (`<state dir>/failures.db`) in WAL mode.

Failure records are evidence, not promises to a caller, so commits use `synchronous=NORMAL`:
in WAL mode a commit survives the process crashing (not necessarily the machine losing power),
and a batch of records costs one write instead of an fsync each. All SQLite calls run on one
dedicated worker thread that owns the only connection, never on the event loop. The file is
opened lazily; a missing or unwritable directory raises `FailureStoreError` on use and is tried
again on the next call. `read_only=True` opens an existing file without changing it (the CLI).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

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
from sidecar.sqlite_wal import open_wal_database

__all__ = ["DB_NAME", "SqliteFailureStore"]

DB_NAME = "failures.db"
_SCHEMA_VERSION = 1

_COLUMNS = RECORD_COLUMNS

_SCHEMA = """
CREATE TABLE IF NOT EXISTS failures (
    id                     TEXT PRIMARY KEY,
    time                   REAL NOT NULL,
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
    latency_ms             REAL,
    upstream_ms            REAL,
    breaker_state          TEXT,
    confidence             REAL,
    confidence_band        TEXT,
    retry_budget_exhausted INTEGER NOT NULL,
    fallback_kind          TEXT,
    review_id              TEXT,
    upstream_status        INTEGER,
    method                 TEXT NOT NULL,
    path                   TEXT NOT NULL,
    cause                  TEXT,
    request_excerpt        TEXT,
    response_excerpt       TEXT,
    note                   TEXT,
    detail                 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS failures_time ON failures (time, id);
CREATE INDEX IF NOT EXISTS failures_request ON failures (request_id, time);
CREATE TABLE IF NOT EXISTS request_counts (
    minute  INTEGER NOT NULL,
    route   TEXT NOT NULL,
    outcome TEXT NOT NULL,
    count   INTEGER NOT NULL,
    PRIMARY KEY (minute, route, outcome)
) WITHOUT ROWID;
"""


T = TypeVar("T")


class SqliteFailureStore:
    """`FailureStore` on a SQLite file."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._conn: sqlite3.Connection | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sidecar-failures"
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
        except sqlite3.Error as exc:
            self._drop_connection()
            raise FailureStoreError(f"failure store {self.path}: {exc}") from exc
        except OSError as exc:
            self._drop_connection()
            raise FailureStoreError(f"failure store {self.path}: {exc.strerror or exc}") from exc

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
        if self.read_only:
            if not self.path.is_file():
                raise FailureStoreError(f"no failure store at {self.path}")
            conn = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, timeout=5.0, isolation_level=None
            )
            conn.row_factory = sqlite3.Row
            self._conn = conn
            return conn
        conn = open_wal_database(
            self.path, synchronous="NORMAL", schema=_SCHEMA, schema_version=_SCHEMA_VERSION
        )
        self._conn = conn
        return conn

    # --- the protocol --------------------------------------------------------------------

    async def write(self, records: Sequence[FailureRecord], counts: Sequence[RequestCount]) -> None:
        if self.read_only:
            raise FailureStoreError(f"failure store {self.path} is open read-only")
        rows = [_row_values(r) for r in records]
        count_rows = [(c.minute, c.route, c.outcome, c.count) for c in counts]
        if not rows and not count_rows:
            return
        insert = (
            f"INSERT OR IGNORE INTO failures ({', '.join(_COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in _COLUMNS)})"
        )

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            if rows:
                conn.executemany(insert, rows)
            if count_rows:
                conn.executemany(
                    "INSERT INTO request_counts (minute, route, outcome, count) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (minute, route, outcome) DO UPDATE"
                    " SET count = count + excluded.count",
                    count_rows,
                )
            conn.execute("COMMIT")

        await self._run(work)

    async def list(self, query: FailureQuery) -> FailurePage:
        where = ["1 = 1"]
        params: dict[str, Any] = {"limit": query.limit + 1}
        if query.since is not None:
            where.append("time >= :since")
            params["since"] = query.since
        if query.until is not None:
            where.append("time < :until")
            params["until"] = query.until
        if query.route is not None:
            where.append("route = :route")
            params["route"] = query.route
        if query.request_id is not None:
            where.append("request_id = :request_id")
            params["request_id"] = query.request_id
        if query.kinds is not None:
            names = [f":kind{i}" for i in range(len(query.kinds))]
            where.append(f"kind IN ({', '.join(names) or 'NULL'})")
            params.update({n[1:]: k.value for n, k in zip(names, query.kinds, strict=True)})
        if query.modes is not None:
            names = [f":mode{i}" for i in range(len(query.modes))]
            where.append(f"mode IN ({', '.join(names) or 'NULL'})")
            params.update({n[1:]: m for n, m in zip(names, query.modes, strict=True)})
        order = "DESC" if query.newest_first else "ASC"
        if query.cursor is not None:
            after_time, after_id = decode_cursor(query.cursor)
            where.append(f"(time, id) {'<' if query.newest_first else '>'} (:at, :aid)")
            params["at"] = after_time
            params["aid"] = after_id
        sql = (
            "SELECT * FROM failures WHERE "
            + " AND ".join(where)
            + f" ORDER BY time {order}, id {order} LIMIT :limit"
        )

        def work(conn: sqlite3.Connection) -> FailurePage:
            rows = conn.execute(sql, params).fetchall()
            records = [_record(row) for row in rows[: query.limit]]
            more = len(rows) > query.limit
            return FailurePage(
                records=records, next_cursor=encode_cursor(records[-1]) if more else None
            )

        return await self._run(work)

    async def request_counts(
        self, since: float | None, until: float | None, route: str | None = None
    ) -> Sequence[RequestCount]:
        where = ["1 = 1"]
        params: dict[str, Any] = {}
        if since is not None:
            where.append("minute >= :since")
            params["since"] = since
        if until is not None:
            where.append("minute < :until")
            params["until"] = until
        if route is not None:
            where.append("route = :route")
            params["route"] = route
        sql = (
            "SELECT minute, route, outcome, count FROM request_counts WHERE "
            + " AND ".join(where)
            + " ORDER BY minute, route, outcome"
        )

        def work(conn: sqlite3.Connection) -> list[RequestCount]:
            return [
                RequestCount(minute=r[0], route=r[1], outcome=r[2], count=r[3])
                for r in conn.execute(sql, params).fetchall()
            ]

        return await self._run(work)

    async def purge(self, now: float, max_age: float, max_rows: int | None) -> int:
        if self.read_only:
            raise FailureStoreError(f"failure store {self.path} is open read-only")
        cutoff = now - max_age

        def work(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            deleted = conn.execute("DELETE FROM failures WHERE time < ?", (cutoff,)).rowcount
            conn.execute("DELETE FROM request_counts WHERE minute < ?", (int(cutoff // 60) * 60,))
            if max_rows is not None:
                total = conn.execute("SELECT count(*) FROM failures").fetchone()[0]
                excess = total - max_rows
                if excess > 0:
                    deleted += conn.execute(
                        "DELETE FROM failures WHERE id IN"
                        " (SELECT id FROM failures ORDER BY time, id LIMIT ?)",
                        (excess,),
                    ).rowcount
            conn.execute("COMMIT")
            return int(deleted)

        return await self._run(work)

    async def pragmas(self) -> dict[str, Any]:
        """The journal settings as the store's own connection sees them (tests, diagnostics)."""

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


def _row_values(record: FailureRecord) -> tuple[Any, ...]:
    return record_values(
        record, flag=int, detail=lambda d: json.dumps(d, separators=(",", ":"), default=str)
    )


def _record(row: sqlite3.Row) -> FailureRecord:
    return record_from_row(dict(row), detail=json.loads)
