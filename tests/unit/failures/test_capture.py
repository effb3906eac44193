"""The recorder: what becomes a record, drops counted (never raised) when the queue is full or the
store fails, per-minute request counters, breaker records, feedback linking, retention, and a
bounded flush on stop."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from sidecar.clock import FakeClock
from sidecar.context import RequestContext
from sidecar.errors import FailureMode
from sidecar.failures.capture import CaptureConfig, FailureRecorder, Feedback
from sidecar.failures.sqlite import DB_NAME, SqliteFailureStore
from sidecar.failures.store import FailureQuery, FailureRecord, RecordKind
from sidecar.outcome import Outcome
from sidecar.strategies.breaker import BreakerConfig, CircuitBreaker


def ctx(clock: FakeClock, request_id: str, mode: FailureMode | None = None) -> RequestContext:
    c = RequestContext(
        request_id=request_id,
        route="chat",
        upstream="model",
        clock=clock,
        started=clock.monotonic(),
        trace_id="cd" * 16,
    )
    c.failure_mode = mode
    return c


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def all_records(store: SqliteFailureStore) -> list[FailureRecord]:
    return (await store.list(FailureQuery(limit=1000))).records


async def test_only_failures_become_records_and_every_request_is_counted(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SqliteFailureStore(tmp_path / DB_NAME)
    recorder = FailureRecorder(store, clock=clock)
    await recorder.start()
    recorder.request_finished(ctx(clock, "ok-1"), 200, Outcome.OK)
    recorder.request_finished(ctx(clock, "retried-1"), 200, Outcome.RETRIED)
    recorder.request_finished(ctx(clock, "fb-1", FailureMode.CONNECT_ERROR), 200, Outcome.FALLBACK)
    recorder.request_finished(
        ctx(clock, "low-1", FailureMode.LOW_CONFIDENCE), 202, Outcome.ESCALATED
    )
    recorder.request_finished(ctx(clock, "shed-1", FailureMode.OVERLOADED), 503, Outcome.ERROR)
    await recorder.stop(5.0)
    reader = SqliteFailureStore(tmp_path / DB_NAME, read_only=True)
    records = await all_records(reader)
    assert sorted(r.request_id for r in records) == ["fb-1", "low-1", "shed-1"]
    by_id = {r.request_id: r for r in records}
    assert by_id["fb-1"].outcome == "fallback" and by_id["fb-1"].mode == "connect_error"
    assert by_id["low-1"].cause == "confidence in the unknown band"
    counts = await reader.request_counts(None, None)
    assert sum(c.count for c in counts) == 5
    assert {c.outcome: c.count for c in counts}["ok"] == 1
    await reader.close()


async def test_a_full_queue_drops_and_counts_never_raises(tmp_path: Path) -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    store = SqliteFailureStore(tmp_path / DB_NAME)
    recorder = FailureRecorder(store, clock=clock, registry=registry, queue_size=3)
    # Not started: nothing drains the queue.
    for i in range(10):
        recorder.request_finished(ctx(clock, f"r{i}", FailureMode.UPSTREAM_5XX), 502, Outcome.ERROR)
    assert recorder.dropped == {"queue_full": 7}
    assert sample(registry, "sidecar_failure_capture_dropped_total", reason="queue_full") == 7
    await recorder.start()
    await recorder.stop(5.0)
    assert recorder.written == {"request": 3}


async def test_an_unusable_store_drops_and_counts(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    clock = FakeClock()
    registry = CollectorRegistry()
    store = SqliteFailureStore(blocker / "state" / DB_NAME)
    recorder = FailureRecorder(store, clock=clock, registry=registry, flush_interval=0.01)
    await recorder.start()
    for i in range(4):
        recorder.request_finished(ctx(clock, f"r{i}", FailureMode.UPSTREAM_5XX), 502, Outcome.ERROR)
    await recorder.stop(5.0)
    assert recorder.dropped == {"store_error": 4}
    assert sample(registry, "sidecar_failure_capture_dropped_total", reason="store_error") == 4


async def test_stop_is_bounded_when_the_store_hangs(tmp_path: Path) -> None:
    class Hanging(SqliteFailureStore):
        async def write(self, records: object, counts: object) -> None:
            await asyncio.sleep(3600)

    clock = FakeClock()
    recorder = FailureRecorder(Hanging(tmp_path / DB_NAME), clock=clock)
    await recorder.start()
    for i in range(3):
        recorder.request_finished(ctx(clock, f"r{i}", FailureMode.UPSTREAM_5XX), 502, Outcome.ERROR)
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await recorder.stop(0.2)


async def test_disabled_by_policy_records_nothing(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SqliteFailureStore(tmp_path / DB_NAME)
    recorder = FailureRecorder(store, clock=clock, config=lambda: CaptureConfig(enabled=False))
    await recorder.start()
    recorder.request_finished(ctx(clock, "r", FailureMode.UPSTREAM_5XX), 502, Outcome.ERROR)
    await recorder.stop(5.0)
    assert recorder.written == {} and not (tmp_path / DB_NAME).exists()


async def test_breaker_transitions_become_records(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SqliteFailureStore(tmp_path / DB_NAME)
    recorder = FailureRecorder(store, clock=clock)
    breaker = CircuitBreaker("model@chat", BreakerConfig(consecutive_failures=1), clock)
    breaker.listeners.append(recorder.breaker_transition)
    await recorder.start()
    breaker.force("open")
    clock.advance(3)
    breaker.force("close")
    await recorder.stop(5.0)
    records = await all_records(SqliteFailureStore(tmp_path / DB_NAME, read_only=True))
    assert [(r.kind, r.upstream, r.route, r.outcome) for r in records] == [
        (RecordKind.BREAKER, "model", "chat", "open"),
        (RecordKind.BREAKER, "model", "chat", "closed"),
    ]


async def test_feedback_links_to_a_stored_failure_a_recent_success_or_nothing(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    store = SqliteFailureStore(tmp_path / DB_NAME)
    recorder = FailureRecorder(store, clock=clock, flush_interval=0.01)
    await recorder.start()
    failed = ctx(clock, "failed-1", FailureMode.INVALID_OUTPUT)
    recorder.request_finished(failed, 502, Outcome.ERROR)
    ok = ctx(clock, "ok-1")
    ok.trace_id = "ef" * 16
    ok.confidence = 0.97
    recorder.request_finished(ok, 200, Outcome.OK)
    for _ in range(500):  # bounded: until the writer stored the failed request
        if recorder.written.get("request") == 1:
            break
        await asyncio.sleep(0.01)

    linked = await recorder.report(Feedback(request_id="failed-1", note="mail a@b.example"))
    assert linked.linked and linked.linked_via == "failure_record"
    assert linked.record.trace_id == "cd" * 16 and linked.record.note == "mail [EMAIL]"
    recent = await recorder.report(Feedback(request_id="ok-1", label="wrong"))
    assert recent.linked_via == "recent_request"
    assert recent.record.trace_id == "ef" * 16 and recent.record.confidence == 0.97
    unknown = await recorder.report(Feedback(request_id="nope", trace_id="12" * 16))
    assert not unknown.linked and unknown.record.trace_id == "12" * 16
    await recorder.stop(5.0)
    rows = await all_records(SqliteFailureStore(tmp_path / DB_NAME, read_only=True))
    reports = [r for r in rows if r.kind is RecordKind.FEEDBACK]
    assert {r.request_id for r in reports} == {"failed-1", "ok-1", "nope"}
    assert all(r.mode == "user_reported" for r in reports)


async def test_retention_by_age_and_rows(tmp_path: Path) -> None:
    store = SqliteFailureStore(tmp_path / DB_NAME)
    records = [
        FailureRecord(
            id=f"{i:032x}",
            time=1000.0 + i,
            kind=RecordKind.REQUEST,
            route="r",
            upstream="u",
            mode="upstream_5xx",
            outcome="error",
        )
        for i in range(300)
    ]
    await store.write(records, [])
    assert await store.purge(now=1000.0 + 300 + 50, max_age=200, max_rows=None) == 150
    assert await store.purge(now=1000.0 + 300, max_age=10_000, max_rows=100) == 50
    left = await all_records(store)
    assert len(left) == 100 and left[0].time == 1200.0
    assert (await store.pragmas())["journal_mode"] == "wal"
    await store.close()
