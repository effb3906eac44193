"""The failure store's contract against both backends, SQLite and PostgreSQL (one schema per
test): a batch of records and request counts committed together, idempotent record ids, pages in
(time, id) order both ways, filters, counts that add up across writers (replicas), and
retention by age and by rows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.failures.postgres import PostgresFailureStore
from sidecar.failures.sqlite import DB_NAME, SqliteFailureStore
from sidecar.failures.store import (
    FailureQuery,
    FailureRecord,
    FailureStore,
    FailureStoreError,
    RecordKind,
    RequestCount,
)

T0 = 1_700_000_000.0


def record(n: int, **fields: Any) -> FailureRecord:
    base: dict[str, Any] = {
        "id": f"{n:032x}",
        "time": T0 + n,
        "kind": RecordKind.REQUEST,
        "route": "r0" if n % 2 == 0 else "r1",
        "upstream": "model",
        "mode": "upstream_5xx" if n % 3 else "attempt_timeout",
        "outcome": "error",
        "request_id": f"req-{n}",
        "trace_id": "t" * 32,
        "status": 502,
        "attempts": 2,
        "retries": 1,
        "latency_ms": 12.5,
        "retry_budget_exhausted": n == 4,
        "cause": "HTTP 503",
        "request_excerpt": '{"inputs": []}',
        "detail": {"events": ["retry"], "n": n},
    }
    base.update(fields)
    return FailureRecord(**base)


@pytest.fixture(params=["sqlite", "postgres"])
async def make(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], FailureStore]]:
    made: list[FailureStore] = []

    def factory() -> FailureStore:
        store: FailureStore
        if request.param == "sqlite":
            store = SqliteFailureStore(tmp_path / DB_NAME)
        else:
            store = PostgresFailureStore(
                request.getfixturevalue("postgres"), schema=request.getfixturevalue("pg_schema")
            )
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.close()


async def every(store: FailureStore, **query: Any) -> list[FailureRecord]:
    out: list[FailureRecord] = []
    cursor = None
    while True:
        page = await store.list(FailureQuery(limit=3, cursor=cursor, **query))
        out += page.records
        cursor = page.next_cursor
        if cursor is None:
            return out


async def test_records_round_trip_and_page_both_ways(make: Callable[[], FailureStore]) -> None:
    store = make()
    records = [record(n) for n in range(10)]
    await store.write(records[:6], [])
    await store.write(records[4:], [])  # ids 4 and 5 again: stored once
    assert await every(store) == records
    assert [r.id for r in await every(store, newest_first=True)] == [r.id for r in records][::-1]
    assert (await every(store))[4].retry_budget_exhausted is True
    assert (await every(store))[7].detail == {"events": ["retry"], "n": 7}
    assert [r.id for r in await every(store, route="r1")] == [
        records[n].id for n in (1, 3, 5, 7, 9)
    ]
    timeouts = await every(store, modes=("attempt_timeout",))
    assert [r.id for r in timeouts] == [records[n].id for n in (0, 3, 6, 9)]
    window = await every(store, since=T0 + 2, until=T0 + 5)
    assert [r.id for r in window] == [records[n].id for n in (2, 3, 4)]
    assert [r.id for r in await every(store, request_id="req-8")] == [records[8].id]
    assert await every(store, kinds=(RecordKind.BREAKER,)) == []
    with pytest.raises(ValueError):
        await store.list(FailureQuery(cursor="not-a-cursor"))


async def test_request_counts_add_up_across_writers(make: Callable[[], FailureStore]) -> None:
    a, b = make(), make()
    minute = int(T0 // 60) * 60
    await asyncio.gather(
        a.write([], [RequestCount(minute, "r0", "ok", 5), RequestCount(minute, "r0", "error", 1)]),
        b.write([], [RequestCount(minute, "r0", "ok", 7)]),
    )
    await a.write([record(1)], [RequestCount(minute + 60, "r1", "ok", 2)])
    counts = await b.request_counts(None, None)
    assert counts == [
        RequestCount(minute, "r0", "error", 1),
        RequestCount(minute, "r0", "ok", 12),
        RequestCount(minute + 60, "r1", "ok", 2),
    ]
    assert await a.request_counts(minute + 60, None) == [RequestCount(minute + 60, "r1", "ok", 2)]
    assert await a.request_counts(None, None, route="r0") == counts[:2]


async def test_retention_by_age_then_by_rows(make: Callable[[], FailureStore]) -> None:
    store = make()
    minute = int(T0 // 60) * 60
    await store.write([record(n) for n in range(10)], [RequestCount(minute, "r0", "ok", 1)])
    # Older than 3 seconds before T0+10 goes (0..6), then only the newest 2 rows stay.
    assert await store.purge(T0 + 10, 3.5, None) == 7
    assert [r.id for r in await every(store)] == [record(n).id for n in (7, 8, 9)]
    assert await store.purge(T0 + 10, 3600, 2) == 1
    assert [r.id for r in await every(store)] == [record(n).id for n in (8, 9)]
    assert await store.purge(T0 + 100_000, 3600, None) == 2
    assert await store.request_counts(None, None) == []


async def test_an_unreachable_postgres_raises_failure_store_error() -> None:
    store = PostgresFailureStore("postgresql://x:pw-secret@127.0.0.1:1/f", timeout=1.0)
    try:
        with pytest.raises(FailureStoreError) as caught:
            await store.write([record(1)], [])
        assert "127.0.0.1:1/f is unreachable" in str(caught.value)
        assert "pw-secret" not in str(caught.value)
    finally:
        await store.close()
