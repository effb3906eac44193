"""What only the PostgreSQL review store has: versioned migrations applied once even when
replicas start together, a clear error (without the password) when the server cannot be
reached, claims that stay single under concurrency from separate pools, the status URL key
shared through the database, and one schema per queue. The shared contract is in
`test_store.py`."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from sidecar.database import Database, DatabaseError
from sidecar.review.postgres import MIGRATIONS, PostgresReviewStore
from sidecar.review.store import NewReview, ReviewConflict, ReviewStoreError


def review(request_id: str) -> NewReview:
    return NewReview(
        request_id=request_id,
        trace_id="t" * 32,
        route="r",
        reason="review",
        action="escalate",
        confidence=0.6,
        request={"body": "{}"},
        answer={"body": "{}"},
    )


def rows(url: str, schema: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url, options=f"-c search_path={schema}") as raw:
        return [tuple(r) for r in raw.execute(sql).fetchall()]


async def test_migrations_apply_once_even_when_replicas_start_together(
    postgres: str, pg_schema: str
) -> None:
    stores = [PostgresReviewStore(postgres, schema=pg_schema) for _ in range(4)]
    try:
        applied = await asyncio.gather(*(s.migrate() for s in stores))
        assert sorted(v for versions in applied for v in versions) == [1, 2, 3]
        assert await stores[0].migrate() == []
    finally:
        for s in stores:
            await s.close()
    assert rows(
        postgres, pg_schema, "SELECT component, version FROM sidecar_migrations ORDER BY 2"
    ) == [("reviews", m.version) for m in MIGRATIONS]


async def test_a_newer_schema_is_refused(postgres: str, pg_schema: str) -> None:
    store = PostgresReviewStore(postgres, schema=pg_schema)
    try:
        await store.migrate()
        with psycopg.connect(postgres, options=f"-c search_path={pg_schema}") as raw:
            raw.execute(
                "INSERT INTO sidecar_migrations (component, version, description)"
                " VALUES ('reviews', 99, 'from the future')"
            )
        other = PostgresReviewStore(postgres, schema=pg_schema)
        with pytest.raises(ReviewStoreError, match="version 99 is newer than this sidecar"):
            await other.enqueue(review("x"))
        await other.close()
    finally:
        await store.close()


async def test_an_unreachable_server_fails_with_a_clear_error() -> None:
    # Port 1 on loopback refuses at once; the password must not appear anywhere.
    store = PostgresReviewStore(
        "postgresql://sidecar:hunter2-secret@127.0.0.1:1/queue", timeout=1.0
    )
    try:
        started = time.monotonic()
        with pytest.raises(ReviewStoreError) as caught:
            await store.enqueue(review("x"))
        assert time.monotonic() - started < 8
        message = str(caught.value)
        assert "postgresql://sidecar@127.0.0.1:1/queue is unreachable" in message
        assert "refused" in message.lower()
        assert "hunter2" not in message
        with pytest.raises(ReviewStoreError):  # and again on the next call, not stuck
            await store.get("a" * 32)
    finally:
        await store.close()


def test_bad_urls_and_schema_names_are_refused() -> None:
    with pytest.raises(ValueError, match="postgresql://"):
        Database("mysql://x/y")
    with pytest.raises(ValueError, match="schema"):
        Database("postgresql://x/y", schema="Robert'); DROP TABLE reviews;--")


async def test_one_claim_wins_across_pools(postgres: str, pg_schema: str) -> None:
    """Eight replicas (pools) race for each of five items: exactly one claim per item wins."""
    replicas = [PostgresReviewStore(postgres, schema=pg_schema, pool_size=2) for _ in range(8)]
    try:
        ids = [(await replicas[0].enqueue(review(f"q{i}"))).item.id for i in range(5)]
        for review_id in ids:
            results = await asyncio.gather(
                *(r.claim(review_id, f"rev{n}", lease=60) for n, r in enumerate(replicas)),
                return_exceptions=True,
            )
            won = [r for r in results if not isinstance(r, BaseException)]
            assert len(won) == 1, results
            assert all(isinstance(r, ReviewConflict) for r in results if r not in won)
            final = await replicas[1].get(review_id)
            assert final is not None and final.claimed_by == won[0].claimed_by
    finally:
        for r in replicas:
            await r.close()


async def test_the_status_url_key_is_shared_and_schemas_are_separate(
    postgres: str, pg_schema: str
) -> None:
    a = PostgresReviewStore(postgres, schema=pg_schema)
    b = PostgresReviewStore(postgres, schema=pg_schema)
    other_schema = pg_schema + "_b"
    c = PostgresReviewStore(postgres, schema=other_schema)
    try:
        key = await a.capability_secret()
        assert key is not None and len(key) == 32
        assert await b.capability_secret() == key
        assert await c.capability_secret() != key
        item = (await a.enqueue(review("only-in-a"))).item
        assert await b.get(item.id) is not None
        assert await c.get(item.id) is None
    finally:
        for s in (a, b, c):
            await s.close()
        with psycopg.connect(postgres, autocommit=True) as raw:
            raw.execute(f'DROP SCHEMA IF EXISTS "{other_schema}" CASCADE')


async def test_database_errors_are_translated(postgres: str, pg_schema: str) -> None:
    db = Database(postgres, schema=pg_schema)
    try:
        with pytest.raises(DatabaseError, match="no_such_table"):
            async with db.connection() as conn:
                await conn.execute("SELECT * FROM no_such_table")
    finally:
        await db.close()
