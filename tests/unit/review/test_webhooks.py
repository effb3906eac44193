"""The webhook sender, step by step on a fake clock against a real aiohttp receiver on loopback:
signed bodies sent byte for byte as stored, exponential backoff with jitter between attempts,
delete on 2xx (the status decides, not the body), at least once when the answer comes after the
sender's timeout, expiry after `max_age`, and events taken but not answered made due again on
stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from sidecar.clock import FakeClock
from sidecar.review.settings import WebhookSettings
from sidecar.review.sqlite import SqliteReviewStore
from sidecar.review.store import NewReview
from sidecar.review.webhooks import WebhookDispatcher, signature, verify_signature

SECRET = b"0123456789abcdef-secret"


class Receiver:
    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.seen: list[tuple[bytes, dict[str, str]]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.arrived = asyncio.Event()
        #: Send the 200 and a first chunk at once, and the rest of the body only after `hold`.
        self.stall_body = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((await request.read(), dict(request.headers)))
        self.arrived.set()
        if self.stall_body:
            resp = web.StreamResponse(status=200)
            await resp.prepare(request)
            await resp.write(b"accepted, ")
            await self.hold.wait()
            with contextlib.suppress(ConnectionResetError):  # the sender has stopped reading
                await resp.write_eof(b"done")
            return resp
        await self.hold.wait()
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield rec, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    rec.hold.set()
    await runner.cleanup()


def new_review(request_id: str) -> NewReview:
    return NewReview(request_id, "t" * 32, "r", "review", "escalate", 0.6, {}, {})


def outbox_rows(path: Path) -> list[tuple[str, int, str | None]]:
    raw = sqlite3.connect(path)
    try:
        return raw.execute("SELECT id, attempts, last_error FROM review_outbox").fetchall()
    finally:
        raw.close()


def test_signatures() -> None:
    body = b'{"id":"x"}'
    header = signature(SECRET, body)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert verify_signature(SECRET, body, header)
    assert not verify_signature(SECRET, body + b" ", header)
    assert not verify_signature(b"another-secret-0000", body, header)
    assert not verify_signature(SECRET, body, None)


async def test_retries_with_backoff_then_delivers_once(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    clock = FakeClock()
    store = SqliteReviewStore(tmp_path / "r.db", clock=clock, outbox_limit=100)
    settings = WebhookSettings(url=url, secret=SECRET, backoff_base=2.0, backoff_max=5.0)
    sender = WebhookDispatcher(store, settings, clock=clock, rng=random.Random(1))

    def due() -> float:
        raw = sqlite3.connect(tmp_path / "r.db")
        try:
            return float(raw.execute("SELECT next_attempt_at FROM review_outbox").fetchone()[0])
        finally:
            raw.close()

    try:
        await store.enqueue(new_review("a"))
        rec.statuses = [500, 503, 500]
        assert await sender.run_once() == 0
        for attempt in (1, 2, 3):
            delay = due() - clock.wall()
            # after attempt n: between half and all of min(5, 2 * 2**(n-1)) seconds
            ceiling = min(5.0, 2.0 * 2 ** (attempt - 1))
            assert ceiling / 2 <= delay <= ceiling, (attempt, delay)
            clock.advance(delay / 2)
            assert await sender.run_once() == 0 and len(rec.seen) == attempt  # not due yet
            clock.advance(delay / 2)
            assert await sender.run_once() == (1 if attempt == 3 else 0)
        assert await store.outbox_size() == 0 and len(rec.seen) == 4
        # The same bytes every time, signed, with the event id in a header.
        assert len({body for body, _ in rec.seen}) == 1
        for body, headers in rec.seen:
            assert verify_signature(SECRET, body, headers["X-Sidecar-Signature"])
            assert headers["X-Sidecar-Event-Id"] == json.loads(body)["id"]
            assert headers["X-Sidecar-Event"] == "review.created"
        assert sender.delivered == 1 and sender.failures == 3
    finally:
        await sender.stop()
        await store.close()


async def test_an_answer_after_the_timeout_means_the_same_event_again(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    """The receiver handles the request but answers 200 only after the sender has given up: the
    sender cannot know, so the event comes again (at least once) with the same id and the same
    signed bytes, the receiver's dedupe key, and is then recorded as delivered."""
    rec, url = receiver
    clock = FakeClock()
    store = SqliteReviewStore(tmp_path / "r.db", clock=clock, outbox_limit=100)
    settings = WebhookSettings(
        url=url, secret=SECRET, timeout=0.5, backoff_base=2.0, backoff_max=5.0
    )
    sender = WebhookDispatcher(store, settings, clock=clock, rng=random.Random(1))
    try:
        await store.enqueue(new_review("slow"))
        ((event_id, _, _),) = outbox_rows(tmp_path / "r.db")
        rec.hold.clear()  # handled now, answered only once the sender's timeout has passed
        first = asyncio.create_task(sender.run_once())
        await asyncio.wait_for(rec.arrived.wait(), 10)
        assert await asyncio.wait_for(first, 10) == 0
        ((_, attempts, error),) = outbox_rows(tmp_path / "r.db")
        assert attempts == 1 and error is not None and "Timeout" in error
        rec.hold.set()  # the late 200 goes to a connection the sender has closed
        for _ in range(5):  # bounded: a retry that also outlives the short timeout goes again
            clock.advance(settings.backoff_max)
            if await sender.run_once() == 1:
                break
        assert outbox_rows(tmp_path / "r.db") == [] and sender.delivered == 1
        assert len(rec.seen) >= 2 and sender.failures == len(rec.seen) - 1
        # Dedupe on the id: every copy is the same event, byte for byte, signed.
        assert len({body for body, _ in rec.seen}) == 1
        for body, headers in rec.seen:
            assert verify_signature(SECRET, body, headers["X-Sidecar-Signature"])
            assert headers["X-Sidecar-Event-Id"] == json.loads(body)["id"] == event_id
    finally:
        rec.hold.set()
        await sender.stop()
        await store.close()


async def test_a_2xx_is_delivered_even_if_its_body_outlives_the_timeout(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    """The status is the receiver's answer: a body still streaming when the timeout passes does
    not turn an accepted event into a retry (a duplicate)."""
    rec, url = receiver
    clock = FakeClock()
    store = SqliteReviewStore(tmp_path / "r.db", clock=clock, outbox_limit=100)
    settings = WebhookSettings(url=url, secret=SECRET, timeout=0.5)
    sender = WebhookDispatcher(store, settings, clock=clock)
    try:
        await store.enqueue(new_review("stalled-body"))
        rec.hold.clear()
        rec.stall_body = True
        assert await sender.run_once() == 1
        assert outbox_rows(tmp_path / "r.db") == []
        assert len(rec.seen) == 1 and sender.delivered == 1 and sender.failures == 0
    finally:
        rec.hold.set()
        await sender.stop()
        await store.close()


async def test_old_events_expire_and_stop_releases_taken_events(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    clock = FakeClock()
    store = SqliteReviewStore(tmp_path / "r.db", clock=clock, outbox_limit=100)
    settings = WebhookSettings(url=url, secret=SECRET, max_age=60.0, timeout=30.0)
    sender = WebhookDispatcher(store, settings, clock=clock)
    try:
        await store.enqueue(new_review("old"))
        clock.advance(120)
        await store.enqueue(new_review("new"))
        rec.hold.clear()  # the receiver does not answer
        sender.start()
        await asyncio.wait_for(rec.arrived.wait(), 10)
        await sender.stop()  # cancelled mid-delivery: the event is due again at once
        (event,) = await store.outbox_take(clock.wall(), 10, 30)
        assert json.loads(event.payload)["review"]["request_id"] == "new"
        assert event.last_error == "interrupted by shutdown"
    finally:
        rec.hold.set()
        await sender.stop()
        await store.close()
