"""The machine's PostgreSQL for tests: find a role that works, give each test its own schema.

The server is expected on 127.0.0.1:5432 with trust auth and a database `test`
(`SIDECAR_TEST_DATABASE_URL` overrides). In CI (`CI` set) a missing server fails the tests that
need it; elsewhere they skip with the reason.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

__all__ = ["drop_schema", "new_schema", "postgres_url", "require_postgres", "schema_for_test"]

_CANDIDATES = (
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
)


def postgres_url() -> str | None:
    """The first URL that answers `SELECT 1`, or None (the reason is in `require_postgres`)."""
    explicit = os.environ.get("SIDECAR_TEST_DATABASE_URL")
    for url in (explicit,) if explicit else _CANDIDATES:
        try:
            with psycopg.connect(url, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            return url
        except psycopg.Error:
            continue
    return None


def require_postgres() -> str:
    url = postgres_url()
    if url is None:
        reason = (
            "PostgreSQL is not reachable at 127.0.0.1:5432 (database test, trust auth, user "
            "postgres or root; or set SIDECAR_TEST_DATABASE_URL)"
        )
        if os.environ.get("CI"):
            pytest.fail(reason + " - required in CI", pytrace=False)
        pytest.skip(reason)
    return url


def new_schema(prefix: str = "t") -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


def drop_schema(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextmanager
def schema_for_test(url: str) -> Iterator[str]:
    schema = new_schema()
    try:
        yield schema
    finally:
        drop_schema(url, schema)
