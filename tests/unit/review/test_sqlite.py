"""What only the SQLite review store has: its durability settings and file mode, failing (then
recovering) on an unusable path, upgrading a file from an older schema, and the status URL key
kept in the state directory. The contract every backend shares is in `test_store.py`."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.clock import FakeClock
from sidecar.review.capability import CapabilitySigner
from sidecar.review.sqlite import SqliteReviewStore
from sidecar.review.store import (
    NewReview,
    ReviewStoreError,
)


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


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SqliteReviewStore]:
    s = SqliteReviewStore(tmp_path / "state" / "reviews.db", clock=clock, retention=3600)
    yield s
    await s.close()


async def test_durability_settings_and_file_mode(store: SqliteReviewStore) -> None:
    await store.enqueue(review("req-1"))
    assert await store.pragmas() == {"journal_mode": "wal", "synchronous": 2}
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


async def test_an_unusable_path_raises_store_error_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "reviews.db"
    path.mkdir()  # a directory where the file should be
    store = SqliteReviewStore(path)
    try:
        with pytest.raises(ReviewStoreError):
            await store.enqueue(review("req-1"))
        path.rmdir()
        assert (await store.enqueue(review("req-1"))).created
    finally:
        await store.close()


def test_capability_tokens_are_signed_per_state_dir(tmp_path: Path) -> None:
    signer = CapabilitySigner.from_state_dir(tmp_path / "a")
    token = signer.token("ab" * 16)
    assert signer.verify(token) == "ab" * 16
    assert CapabilitySigner.from_state_dir(tmp_path / "a").verify(token) == "ab" * 16
    assert stat.S_IMODE((tmp_path / "a" / "status-url.key").stat().st_mode) == 0o600
    assert CapabilitySigner.from_state_dir(tmp_path / "b").verify(token) is None
    assert signer.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert signer.verify("cd" * 16 + "." + token.split(".")[1]) is None
    assert signer.verify("no-dot") is None


def test_an_older_file_is_upgraded_in_place(tmp_path: Path) -> None:
    """A version-1 file (before the webhook outbox) keeps its items and gains the outbox."""
    path = tmp_path / "reviews.db"
    raw = sqlite3.connect(path)
    raw.executescript(
        "CREATE TABLE reviews (id TEXT PRIMARY KEY, request_id TEXT NOT NULL UNIQUE,"
        " trace_id TEXT NOT NULL, route TEXT NOT NULL, reason TEXT NOT NULL,"
        " action TEXT NOT NULL, confidence REAL, request TEXT NOT NULL, answer TEXT NOT NULL,"
        " status TEXT NOT NULL DEFAULT 'pending', created_at REAL NOT NULL, claimed_by TEXT,"
        " lease_until REAL, decision TEXT, reviewer TEXT, note TEXT, corrected TEXT,"
        " resolved_at REAL);"
        "INSERT INTO reviews (id, request_id, trace_id, route, reason, action, request, answer,"
        f" created_at) VALUES ('{'a' * 32}', 'old-1', 't', 'r', 'review', 'escalate', '{{}}',"
        " '{}', 1.0);"
        "PRAGMA user_version=1;"
    )
    raw.close()

    async def upgrade() -> tuple[int, int]:
        store = SqliteReviewStore(path, outbox_limit=10)
        try:
            backlog = await store.backlog()
            return backlog[0], await store.outbox_size()
        finally:
            await store.close()

    assert asyncio.run(upgrade()) == (1, 0)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 2
    raw.close()
