"""The review store's contract, run against every backend: the SQLite file and PostgreSQL (the
machine's server, one schema per test). Idempotent enqueue committed before it returns, leases
that expire, resolve once, claim-next handing out each item once, filters and pages, retention,
the webhook outbox written with the change it reports, and the desk on top of each."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sidecar.clock import FakeClock
from sidecar.review.desk import ReviewDesk
from sidecar.review.postgres import PostgresReviewStore
from sidecar.review.sqlite import SqliteReviewStore
from sidecar.review.store import (
    Decision,
    NewReview,
    Resolution,
    ReviewConflict,
    ReviewNotFound,
    ReviewQuery,
    ReviewStatus,
    ReviewStore,
)

BACKENDS = ["sqlite", "postgres"]


def review(request_id: str, route: str = "classifier", confidence: float | None = 0.7) -> NewReview:
    return NewReview(
        request_id=request_id,
        trace_id="t" * 32,
        route=route,
        reason="review",
        action="escalate",
        confidence=confidence,
        request={"method": "POST", "path": "/v2/models/m/infer", "body": '{"inputs": []}'},
        answer={"status": 200, "body": '{"outputs": []}'},
    )


@dataclass
class Backend:
    name: str
    make: Callable[..., ReviewStore]
    #: Rows as another connection (another process) sees them.
    committed: Callable[[str], list[tuple[Any, ...]]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=BACKENDS)
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Backend]:
    made: list[ReviewStore] = []
    if request.param == "sqlite":
        path = tmp_path / "state" / "reviews.db"

        def make(**kwargs: Any) -> ReviewStore:
            kwargs.setdefault("clock", clock)
            kwargs.setdefault("retention", 3600)
            store = SqliteReviewStore(path, **kwargs)
            made.append(store)
            return store

        def committed(sql: str) -> list[tuple[Any, ...]]:
            raw = sqlite3.connect(path)
            try:
                return [tuple(row) for row in raw.execute(sql).fetchall()]
            finally:
                raw.close()

    else:
        url = request.getfixturevalue("postgres")
        schema = request.getfixturevalue("pg_schema")

        def make(**kwargs: Any) -> ReviewStore:
            kwargs.setdefault("clock", clock)
            kwargs.setdefault("retention", 3600)
            store = PostgresReviewStore(url, schema=schema, pool_size=4, **kwargs)
            made.append(store)
            return store

        def committed(sql: str) -> list[tuple[Any, ...]]:
            with psycopg.connect(url, options=f"-c search_path={schema}") as raw:
                return [tuple(row) for row in raw.execute(sql).fetchall()]

    yield Backend(request.param, make, committed)
    for store in made:
        await store.close()


@pytest.fixture
def store(backend: Backend) -> ReviewStore:
    return backend.make()


async def test_enqueue_is_idempotent_by_request_id_and_committed(
    backend: Backend, store: ReviewStore
) -> None:
    first = await store.enqueue(review("req-1"))
    again = await store.enqueue(review("req-1", route="other"))
    assert first.created and not again.created
    assert again.item.id == first.item.id and again.item.route == "classifier"
    # Committed: another connection sees it at once.
    assert backend.committed("SELECT id, request_id, status FROM reviews") == [
        (first.item.id, "req-1", "pending")
    ]
    item = await store.get(first.item.id)
    assert item is not None and item.request["body"] == '{"inputs": []}'
    assert item.status is ReviewStatus.PENDING and item.confidence == 0.7


async def test_claim_lease_expires(store: ReviewStore, clock: FakeClock) -> None:
    item = (await store.enqueue(review("req-1"))).item
    claimed = await store.claim(item.id, "alice", lease=60)
    assert claimed.status is ReviewStatus.CLAIMED and claimed.claimed_by == "alice"
    with pytest.raises(ReviewConflict):
        await store.claim(item.id, "bob", lease=60)
    with pytest.raises(ReviewConflict):
        await store.resolve(item.id, Resolution(Decision.APPROVE, "bob"))
    renewed = await store.claim(item.id, "alice", lease=60)  # the holder may renew
    assert renewed.lease_until == clock.wall() + 60
    clock.advance(61)
    expired = await store.get(item.id)
    assert expired is not None and expired.status is ReviewStatus.PENDING
    assert expired.claimed_by is None
    page = await store.list(ReviewQuery(status=ReviewStatus.PENDING))
    assert [i.id for i in page.items] == [item.id]
    taken = await store.claim(item.id, "bob", lease=60)
    assert taken.claimed_by == "bob"
    with pytest.raises(ReviewNotFound):
        await store.claim("f" * 32, "bob", lease=60)


async def test_resolve_once(store: ReviewStore) -> None:
    item = (await store.enqueue(review("req-1"))).item
    done = await store.resolve(
        item.id, Resolution(Decision.OVERRIDE, "alice", "wrong class", {"label": "fraud"})
    )
    assert done.status is ReviewStatus.RESOLVED and done.decision is Decision.OVERRIDE
    assert (done.reviewer, done.note, done.corrected) == (
        "alice",
        "wrong class",
        {"label": "fraud"},
    )
    with pytest.raises(ReviewConflict, match="already resolved"):
        await store.resolve(item.id, Resolution(Decision.REJECT, "bob"))
    with pytest.raises(ReviewConflict):
        await store.claim(item.id, "bob", lease=60)
    with pytest.raises(ReviewNotFound):
        await store.resolve("f" * 32, Resolution(Decision.APPROVE, "bob"))
    assert await store.get("f" * 32) is None
    again = await store.get(item.id)
    assert again is not None and again.corrected == {"label": "fraud"}


async def test_concurrent_resolves_only_one_wins(backend: Backend, store: ReviewStore) -> None:
    item = (await store.enqueue(review("req-1"))).item
    # Two stores: in PostgreSQL, two pools, as two replicas would have.
    other = backend.make()
    results = await asyncio.gather(
        *(
            (store if i % 2 else other).resolve(item.id, Resolution(Decision.APPROVE, f"r{i}"))
            for i in range(6)
        ),
        return_exceptions=True,
    )
    assert sum(1 for r in results if isinstance(r, ReviewConflict)) == 5, results
    winners = [r for r in results if not isinstance(r, BaseException)]
    final = await store.get(item.id)
    assert final is not None and final.reviewer == winners[0].reviewer


async def test_claim_next_hands_out_each_item_once(
    backend: Backend, store: ReviewStore, clock: FakeClock
) -> None:
    ids = []
    for i in range(6):
        ids.append((await store.enqueue(review(f"req-{i}", route=f"r{i % 2}"))).item.id)
        clock.advance(1)
    other = backend.make()
    claimed = await asyncio.gather(
        *((store if i % 2 else other).claim_next(f"rev{i}", lease=60) for i in range(10))
    )
    got = [item.id for item in claimed if item is not None]
    assert sorted(got) == sorted(ids) and claimed.count(None) == 4
    assert all(i.status is ReviewStatus.CLAIMED for i in claimed if i is not None)
    assert await store.claim_next("late", lease=60) is None
    clock.advance(61)  # every lease ran out: pending again, oldest first, by route
    first = await store.claim_next("carol", lease=60, route="r1")
    assert first is not None and first.id == ids[1] and first.claimed_by == "carol"
    oldest = await store.claim_next("dave", lease=60)
    assert oldest is not None and oldest.id == ids[0]
    await store.resolve(ids[2], Resolution(Decision.REJECT, "erin"))
    nxt = await store.claim_next("erin", lease=60)
    assert nxt is not None and nxt.id == ids[3]


async def test_filters_and_pages(store: ReviewStore, clock: FakeClock) -> None:
    ids = []
    for i in range(5):
        ids.append((await store.enqueue(review(f"req-{i}", route=f"r{i % 2}"))).item.id)
        clock.advance(60)
    await store.resolve(ids[0], Resolution(Decision.REJECT, "alice"))
    r0 = await store.list(ReviewQuery(route="r0"))
    assert [i.id for i in r0.items] == [ids[0], ids[2], ids[4]]
    pending = await store.list(ReviewQuery(status=ReviewStatus.PENDING))
    assert [i.id for i in pending.items] == ids[1:]
    # Created 300, 240, 180, 120, 60 seconds ago.
    old = await store.list(ReviewQuery(min_age=150))
    assert [i.id for i in old.items] == ids[:3]
    recent = await store.list(ReviewQuery(max_age=150))
    assert [i.id for i in recent.items] == ids[3:]
    seen, cursor = [], None
    while True:
        page = await store.list(ReviewQuery(limit=2, cursor=cursor))
        seen += [i.id for i in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == ids
    with pytest.raises(ValueError):
        await store.list(ReviewQuery(cursor="bm90IGEgY3Vyc29y"))
    assert await store.backlog() == (4, clock.wall() - 240)


async def test_retention_purges_only_resolved_items(store: ReviewStore, clock: FakeClock) -> None:
    old_resolved = (await store.enqueue(review("a"))).item
    old_pending = (await store.enqueue(review("b"))).item
    await store.resolve(old_resolved.id, Resolution(Decision.APPROVE, "alice"))
    clock.advance(7200)
    assert await store.purge(3600) == 1
    assert await store.get(old_resolved.id) is None
    assert await store.get(old_pending.id) is not None


async def test_no_outbox_events_without_webhooks(store: ReviewStore) -> None:
    item = (await store.enqueue(review("a"))).item
    await store.resolve(item.id, Resolution(Decision.APPROVE, "alice"))
    assert await store.outbox_size() == 0


async def test_outbox_events_commit_with_their_change(backend: Backend, clock: FakeClock) -> None:
    store = backend.make(outbox_limit=100)
    item = (await store.enqueue(review("a"))).item
    assert not (await store.enqueue(review("a"))).created  # a duplicate adds no event
    clock.advance(5)
    await store.resolve(item.id, Resolution(Decision.OVERRIDE, "alice", "n", {"x": 1}))
    with pytest.raises(ReviewConflict):
        await store.resolve(item.id, Resolution(Decision.APPROVE, "bob"))  # rolled back: none
    assert backend.committed("SELECT kind, review_id FROM review_outbox ORDER BY seq") == [
        ("review.created", item.id),
        ("review.resolved", item.id),
    ]
    now = clock.wall()
    events = await store.outbox_take(now, 10, lease=30)
    assert [e.kind for e in events] == ["review.created", "review.resolved"]
    created, resolved = (json.loads(e.payload) for e in events)
    assert created["id"] == events[0].id and created["type"] == "review.created"
    assert created["review"]["id"] == item.id and created["review"]["status"] == "pending"
    assert resolved["review"]["decision"] == "override"
    assert resolved["review"]["reviewer"] == "alice"
    assert "request" not in resolved["review"] and "answer" not in resolved["review"]
    # Leased: nobody else takes them until the lease runs out.
    assert await store.outbox_take(now, 10, lease=30) == []
    await store.outbox_delivered(events[0].id)
    await store.outbox_retry(events[1].id, now + 2, "HTTP 500")
    assert await store.outbox_take(now + 1, 10, lease=30) == []
    (again,) = await store.outbox_take(now + 2, 10, lease=30)
    assert (again.id, again.attempts, again.last_error) == (events[1].id, 1, "HTTP 500")
    assert again.payload == events[1].payload  # the same bytes, so the same signature
    assert await store.outbox_size() == 1
    assert await store.outbox_expire(now - 1) == 0
    assert await store.outbox_expire(now + 100) == 1
    assert await store.outbox_size() == 0


async def test_outbox_is_bounded_oldest_dropped_first(backend: Backend) -> None:
    store = backend.make(outbox_limit=3)
    ids = [(await store.enqueue(review(f"r{i}"))).item.id for i in range(5)]
    assert await store.outbox_size() == 3
    assert store.outbox_dropped == 2
    rows = backend.committed("SELECT review_id FROM review_outbox ORDER BY seq")
    assert [r[0] for r in rows] == ids[2:]


async def test_desk_wakes_a_held_request_when_its_item_is_resolved(
    backend: Backend, tmp_path: Path
) -> None:
    desk = ReviewDesk(backend.make(clock=None), tmp_path / "desk", poll_interval=30)
    ticket = await desk.submit(review("req-1"))
    assert ticket.created and ticket.status_url.startswith("/reviews/status/")
    assert desk.verify(ticket.status_url.rsplit("/", 1)[1]) == ticket.review_id
    waiter = asyncio.create_task(desk.wait_decision(ticket.review_id, timeout=20))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await desk.resolve(ticket.review_id, Resolution(Decision.APPROVE, "alice"))
    item = await asyncio.wait_for(waiter, 5)  # woken at once, not after the 30s poll
    assert item is not None and item.decision is Decision.APPROVE
    assert await desk.wait_decision("f" * 32, timeout=0.01) is None
