"""PostgreSQL plumbing shared by the review queue and the failure store: the connection pool,
versioned migrations, and one place where psycopg's exceptions become `DatabaseError`.

Several replicas share one database, so everything here assumes concurrent peers: migrations
run under a transaction-scoped advisory lock (two pods starting at once apply each migration
once), and the pool checks a connection before lending it, so a database restart costs no
request a stale connection. The pool opens lazily on first use; when the server cannot be
reached, the error names the server (never the password) and what libpq said, and the next call
tries again. Callers (the stores) turn `DatabaseError` into their own store errors, which make
the confidence gate fail closed.

Every table name a store uses is unqualified: `schema` (a PostgreSQL schema, created when
missing) is put first on the connection's `search_path`, so one database can hold several
independent queues (and each test its own).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # psycopg (with its bundled libpq) is loaded only when a PostgreSQL store is used: the
    # review settings import the URL helpers below on every start (idle memory).
    from psycopg import AsyncConnection
    from psycopg.rows import DictRow
    from psycopg_pool import AsyncConnectionPool

    Connection = AsyncConnection[DictRow]

__all__ = [
    "SCHEMA_PATTERN",
    "Database",
    "DatabaseError",
    "Migration",
    "display_url",
    "is_postgres_url",
]

#: A schema name we create and put on the search path: plain lower-case identifiers only.
SCHEMA_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"
_SCHEMA = re.compile(SCHEMA_PATTERN)
_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS sidecar_migrations (
    component   TEXT NOT NULL,
    version     INTEGER NOT NULL,
    description TEXT NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


class DatabaseError(Exception):
    """The database failed or could not be reached; nothing was stored."""


@dataclass(frozen=True)
class Migration:
    """One step of a component's schema; applied once, in version order, in one transaction."""

    version: int
    description: str
    sql: str


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def display_url(url: str) -> str:
    """`postgresql://user@host:port/db` for messages and logs: never the password."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://<unparseable URL>"
    user = f"{info['user']}@" if info.get("user") else ""
    host = info.get("host") or "localhost"
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user}{host}{port}/{info.get('dbname') or ''}"


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class Database:
    """A lazily opened pool for one database URL and (optional) schema."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 3.0,
        name: str = "sidecar",
    ) -> None:
        if not is_postgres_url(url):
            raise ValueError("a PostgreSQL URL starts with postgresql:// or postgres://")
        if schema is not None and not _SCHEMA.fullmatch(schema):
            raise ValueError(f"schema {schema!r}: lower-case letters, digits and _ only")
        self.url = url
        self.schema = schema
        self.display = display_url(url)
        self.timeout = timeout
        self._min_size = min(min_size, max_size)
        self._max_size = max_size
        self._name = name
        self._pool: AsyncConnectionPool[Connection] | None = None
        self._opening = asyncio.Lock()
        self._closed = False

    def _kwargs(self) -> dict[str, Any]:
        from psycopg.rows import dict_row

        kwargs: dict[str, Any] = {
            "autocommit": True,
            "row_factory": dict_row,
            # libpq takes whole seconds, at least 2.
            "connect_timeout": max(2, round(self.timeout)),
            "application_name": self._name,
        }
        if self.schema is not None:
            kwargs["options"] = f"-c search_path={self.schema}"
        return kwargs

    async def _open(self) -> AsyncConnectionPool[Connection]:
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._closed:
                raise DatabaseError(f"{self.display}: the pool is closed")
            if self._pool is None:
                from psycopg import AsyncConnection
                from psycopg.rows import DictRow
                from psycopg_pool import AsyncConnectionPool

                pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
                    self.url,
                    connection_class=AsyncConnection[DictRow],
                    kwargs=self._kwargs(),
                    min_size=self._min_size,
                    max_size=self._max_size,
                    open=False,
                    timeout=self.timeout,
                    check=AsyncConnectionPool.check_connection,
                    name=self._name,
                    # Keep trying in the background; requests meanwhile fail closed.
                    reconnect_timeout=3600.0,
                )
                await pool.open(wait=False)
                self._pool = pool
        assert self._pool is not None
        return self._pool

    async def _why_unreachable(self) -> str:
        """The pool only says it timed out; one direct attempt tells what libpq says."""
        import psycopg
        from psycopg import AsyncConnection

        try:
            conn = await AsyncConnection.connect(self.url, **self._kwargs())
        except psycopg.Error as exc:
            return _describe(exc)
        await conn.close()
        return f"no connection became free within {self.timeout:g}s"

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection in autocommit mode; use `conn.transaction()` for atomic work.
        Every psycopg or pool failure leaves as `DatabaseError`."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            pool = await self._open()
            async with pool.connection() as conn:
                yield conn
        except PoolTimeout:
            reason = await self._why_unreachable()
            raise DatabaseError(f"database {self.display} is unreachable: {reason}") from None
        except psycopg.OperationalError as exc:
            raise DatabaseError(f"database {self.display}: {_describe(exc)}") from exc
        except psycopg.Error as exc:
            raise DatabaseError(f"database {self.display}: {_describe(exc)}") from exc

    async def migrate(self, component: str, migrations: Sequence[Migration]) -> list[int]:
        """Apply the component's migrations not applied yet; returns the versions applied now.
        Concurrent callers (replicas starting together) serialise on an advisory lock."""
        applied: list[int] = []
        async with self.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"sidecar-migrate:{component}",)
            )
            if self.schema is not None:
                # Identifier checked against SCHEMA_PATTERN in __init__.
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute(_MIGRATIONS_TABLE)
            cursor = await conn.execute(
                "SELECT version FROM sidecar_migrations WHERE component = %s", (component,)
            )
            done = {int(row["version"]) for row in await cursor.fetchall()}
            newest = max((m.version for m in migrations), default=0)
            if done and max(done) > newest:
                raise DatabaseError(
                    f"database {self.display}: {component} schema version {max(done)} is newer "
                    f"than this sidecar ({newest}); upgrade the sidecar"
                )
            for migration in sorted(migrations, key=lambda m: m.version):
                if migration.version in done:
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO sidecar_migrations (component, version, description)"
                    " VALUES (%s, %s, %s)",
                    (component, migration.version, migration.description),
                )
                applied.append(migration.version)
        return applied

    async def close(self) -> None:
        async with self._opening:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=2.0)
