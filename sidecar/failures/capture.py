"""Failure capture: every failed, fallback, shed, escalated or rejected request becomes a record.

The proxy calls `FailureRecorder.request_finished` once per request, at the very end (its
`finally`). That call only counts the request, takes references to what the request left on
`ctx.extra` and puts a pending record on a bounded queue: it never blocks, never raises, and a
full queue drops the record and counts the drop (`sidecar_failure_capture_dropped_total`). A
background writer task takes batches off the queue, redacts them on a worker thread and writes
them with the per-minute request counters in one transaction; it also applies the retention.
Breaker transitions become `breaker` records (the report's recovery times), and `POST /feedback`
writes a `user_reported` record directly, answering only after it is committed.

Request rates in the report come from the per-minute counters (route × outcome) the recorder
keeps for every request, written with each batch; no per-request row is kept for successes.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from sidecar.clock import Clock
from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.failures.redact import RawExcerpt, RedactionRules, Redactor
from sidecar.failures.sqlite import DB_NAME, SqliteFailureStore
from sidecar.failures.store import (
    FailureQuery,
    FailureRecord,
    FailureStore,
    FailureStoreError,
    RecordKind,
    RequestCount,
)
from sidecar.outcome import Outcome
from sidecar.pipeline import BytesBody, ProxyRequest, ProxyResponse
from sidecar.policy.schema import FailuresPolicy, Policy
from sidecar.server.respond import envelope, error_status
from sidecar.telemetry.logging import get_logger

if TYPE_CHECKING:
    from sidecar.server.state import SidecarState
    from sidecar.strategies.breaker import CircuitBreaker

__all__ = [
    "CAPTURE_ERROR",
    "CAPTURE_REQUEST",
    "CAPTURE_RESPONSE",
    "NO_ROUTE",
    "CaptureConfig",
    "FailureRecorder",
    "Feedback",
    "FeedbackResult",
    "capture_config",
    "install_failure_capture",
    "should_capture",
]

#: `ctx.extra` keys the proxy fills: the `ProxyRequest` sent into the pipeline, the
#: `ProxyResponse` that came out of it, and the `SidecarError` the caller was answered with.
CAPTURE_REQUEST = "failures.request"
CAPTURE_RESPONSE = "failures.response"
CAPTURE_ERROR = "failures.error"

#: The route of requests that matched none (as in the metrics' `route` label).
NO_ROUTE = "(none)"

_CAPTURED_OUTCOMES = frozenset(
    {Outcome.FALLBACK, Outcome.ESCALATED, Outcome.REJECTED, Outcome.ERROR}
)
#: Bodies are cut to this before they are queued (redaction needs a little more than the excerpt).
_RAW_CAP = 64 * 1024
_MAX_CAUSE = 300
#: How long the writer waits for more records once one arrived (batches bursts).
GATHER_WINDOW = 0.05
_MAX_NOTE = 4000
_MAX_EVENTS = 32
_MAX_PENDING_COUNTS = 20_000
_LOG_EVERY = 60.0

log = get_logger("sidecar.failures")


@dataclass(frozen=True)
class CaptureConfig:
    """The policy's `failures:` section as plain config."""

    enabled: bool = True
    rules: RedactionRules = field(default_factory=RedactionRules)
    max_age: float = 30 * 86400.0
    max_rows: int | None = 100_000


def capture_config(policy: FailuresPolicy | None) -> CaptureConfig:
    if policy is None:
        return CaptureConfig()
    redact = policy.redact
    return CaptureConfig(
        enabled=policy.enabled,
        rules=RedactionRules(
            headers=frozenset(h.lower() for h in redact.headers),
            json_paths=tuple(redact.json_paths),
            patterns=tuple(redact.patterns),
            emails=redact.emails,
            card_numbers=redact.card_numbers,
            max_excerpt=policy.max_excerpt,
        ),
        max_age=policy.retention.max_age,
        max_rows=policy.retention.max_rows,
    )


def should_capture(ctx: RequestContext, outcome: Outcome) -> bool:
    """Failed, fallback, shed, escalated or rejected: anything but a plain (or retried) success."""
    return ctx.failure_mode is not None or outcome in _CAPTURED_OUTCOMES


@dataclass(frozen=True)
class Feedback:
    """What `POST /feedback` carries, validated."""

    request_id: str
    note: str | None = None
    trace_id: str | None = None
    label: str | None = None
    corrected: Any = None


@dataclass(frozen=True)
class FeedbackResult:
    record: FailureRecord
    linked: bool
    #: "failure_record" (a stored record of that request) or "recent_request" (a request this
    #: process answered lately); None when the request id is unknown.
    linked_via: str | None


@dataclass(frozen=True)
class _Recent:
    """What is kept of every recent request, so feedback on a success can still be linked."""

    time: float
    trace_id: str
    route: str
    upstream: str
    outcome: str
    status: int
    method: str
    path: str
    confidence: float | None
    confidence_band: str | None
    review_id: str | None


@dataclass
class _Pending:
    record: FailureRecord
    request: RawExcerpt | None
    response: RawExcerpt | None
    rules: RedactionRules
    size: int


class _Stop:
    pass


_STOP = _Stop()


class FailureRecorder:
    """Owned by `SidecarState.failures`; started and stopped by `sidecar.app.Sidecar`."""

    def __init__(
        self,
        store: FailureStore,
        *,
        clock: Clock,
        config: Callable[[], CaptureConfig] = CaptureConfig,
        registry: CollectorRegistry | None = None,
        queue_size: int = 1024,
        max_queued_bytes: int = 16 * 1024 * 1024,
        batch_size: int = 256,
        flush_interval: float = 0.5,
        purge_interval: float = 60.0,
        recent_size: int = 4096,
    ) -> None:
        self.store = store
        self.clock = clock
        self.config = config
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.purge_interval = purge_interval
        self.max_queued_bytes = max_queued_bytes
        self.recent_size = recent_size
        self._queue: asyncio.Queue[_Pending | _Stop] = asyncio.Queue(maxsize=queue_size)
        self._queued_bytes = 0
        self._counts: dict[tuple[int, str, str], int] = {}
        self._recent: OrderedDict[str, _Recent] = OrderedDict()
        self._redactors: dict[RedactionRules, Redactor] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_log: dict[str, float] = {}
        #: Plain counters (also in the metrics when a registry is given).
        self.written: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        if registry is None:  # a bare recorder (tests): metrics of its own
            registry = CollectorRegistry(auto_describe=True)
        self._written_metric = Counter(
            "sidecar_failure_records",
            "Failure records written to the failure store, by kind.",
            ["kind"],
            registry=registry,
        )
        self._dropped_metric = Counter(
            "sidecar_failure_capture_dropped",
            "Failure records not stored, by reason (queue_full, queue_bytes, store_error, "
            "shutdown, error).",
            ["reason"],
            registry=registry,
        )

    # -- the request path (synchronous, on the event loop; never raises) ------------------------
    def request_finished(self, ctx: RequestContext, status: int, outcome: Outcome) -> None:
        """Count the request; queue a record when it failed, fell back, was shed, escalated or
        rejected. Called once per request from the proxy's `finally`."""
        try:
            config = self.config()
            if not config.enabled:
                return
            now = self.clock.wall()
            route = ctx.route or NO_ROUTE
            key = (int(now // 60) * 60, route, outcome.value)
            self._counts[key] = self._counts.get(key, 0) + 1
            self._remember(ctx, status, outcome, now)
            if not should_capture(ctx, outcome):
                return
            self.record(
                ctx,
                self._request_excerpt(ctx),
                self._response_excerpt(ctx),
                status=status,
                outcome=outcome,
                config=config,
            )
        except Exception as exc:  # capture must never fail a request
            self._drop("error")
            self._log_once("failure_capture_error", error=f"{type(exc).__name__}: {exc}")

    def record(
        self,
        ctx: RequestContext,
        request_excerpt: RawExcerpt | None,
        response_excerpt: RawExcerpt | None,
        *,
        status: int,
        outcome: Outcome,
        config: CaptureConfig | None = None,
    ) -> bool:
        """Queue one request record (redacted later, off the event loop). False when dropped."""
        config = config or self.config()
        err = ctx.extra.get(CAPTURE_ERROR)
        record = FailureRecord(
            id=secrets.token_hex(16),
            time=self.clock.wall(),
            kind=RecordKind.REQUEST,
            route=ctx.route or NO_ROUTE,
            upstream=ctx.upstream,
            mode=ctx.failure_mode.value if ctx.failure_mode is not None else None,
            outcome=outcome.value,
            request_id=ctx.request_id,
            trace_id=ctx.trace_id,
            status=status,
            attempts=ctx.attempts,
            retries=ctx.retries,
            latency_ms=round(ctx.elapsed() * 1000, 3),
            upstream_ms=round(ctx.upstream_seconds * 1000, 3),
            # Stored as the metrics' label values: closed, half_open, open.
            breaker_state=ctx.breaker_state.replace("-", "_") if ctx.breaker_state else None,
            confidence=ctx.confidence,
            confidence_band=ctx.confidence_band,
            retry_budget_exhausted=ctx.budget_refused,
            fallback_kind=ctx.fallback_kind,
            review_id=ctx.review_id,
            upstream_status=ctx.upstream_status,
            method=ctx.method,
            path=ctx.path,
            cause=_cause(ctx, err if isinstance(err, SidecarError) else None),
            detail=_detail(ctx),
        )
        size = 1024
        for part in (request_excerpt, response_excerpt):
            if part is not None and part.body is not None:
                size += len(part.body)
        return self._enqueue(
            _Pending(record, request_excerpt, response_excerpt, config.rules, size)
        )

    def breaker_transition(
        self, breaker: CircuitBreaker, old: str, new: str, ctx: RequestContext | None
    ) -> None:
        """A `CircuitBreaker` listener: each transition becomes a `breaker` record."""
        try:
            config = self.config()
            if not config.enabled:
                return
            upstream, _, route = breaker.name.partition("@")
            to = new.replace("-", "_")
            detail: dict[str, Any] = {
                "breaker": breaker.name,
                "from": old.replace("-", "_"),
                "to": to,
            }
            if to == "closed" and breaker.last_recovery_seconds is not None:
                detail["recovery_seconds"] = round(breaker.last_recovery_seconds, 3)
            if to == "open":
                detail["open_for"] = round(max(0.0, breaker.open_until - self.clock.monotonic()), 3)
            record = FailureRecord(
                id=secrets.token_hex(16),
                time=self.clock.wall(),
                kind=RecordKind.BREAKER,
                route=route,
                upstream=upstream,
                mode=None,
                outcome=to,
                request_id=ctx.request_id if ctx is not None else "",
                trace_id=ctx.trace_id if ctx is not None else "",
                breaker_state=to,
                detail=detail,
            )
            self._enqueue(_Pending(record, None, None, config.rules, 512))
        except Exception as exc:
            self._drop("error")
            self._log_once("failure_capture_error", error=f"{type(exc).__name__}: {exc}")

    # -- feedback (awaited by the admin handler) ------------------------------------------------
    async def report(self, feedback: Feedback) -> FeedbackResult:
        """Store a `user_reported` record linked to the original request when it is known: a
        stored failure record of it, or a request this process answered lately. Returns after
        the record is committed; raises `FailureStoreError` when it could not be."""
        config = self.config()
        page = await self.store.list(
            FailureQuery(
                request_id=feedback.request_id,
                kinds=(RecordKind.REQUEST,),
                limit=1,
                newest_first=True,
            )
        )
        original = page.records[0] if page.records else None
        recent = self._recent.get(feedback.request_id)
        detail: dict[str, Any] = {"linked": original is not None or recent is not None}
        if feedback.label is not None:
            detail["label"] = feedback.label
        if feedback.corrected is not None:
            detail["corrected"] = feedback.corrected
        base: dict[str, Any] = {
            "route": NO_ROUTE,
            "upstream": "",
            "trace_id": feedback.trace_id or "",
            "outcome": "unknown",
        }
        linked_via: str | None = None
        if original is not None:
            linked_via = "failure_record"
            detail["original_record_id"] = original.id
            detail["original_mode"] = original.mode
            base.update(
                route=original.route,
                upstream=original.upstream,
                trace_id=original.trace_id,
                outcome=original.outcome,
                status=original.status,
                method=original.method,
                path=original.path,
                confidence=original.confidence,
                confidence_band=original.confidence_band,
                review_id=original.review_id,
                fallback_kind=original.fallback_kind,
            )
        elif recent is not None:
            linked_via = "recent_request"
            detail["original_time"] = recent.time
            base.update(
                route=recent.route,
                upstream=recent.upstream,
                trace_id=recent.trace_id,
                outcome=recent.outcome,
                status=recent.status,
                method=recent.method,
                path=recent.path,
                confidence=recent.confidence,
                confidence_band=recent.confidence_band,
                review_id=recent.review_id,
            )
        if feedback.trace_id and base["trace_id"] != feedback.trace_id:
            detail["reported_trace_id"] = feedback.trace_id
        detail["linked_via"] = linked_via
        redactor = self._redactor(config.rules)
        record = FailureRecord(
            id=secrets.token_hex(16),
            time=self.clock.wall(),
            kind=RecordKind.FEEDBACK,
            mode=FailureMode.USER_REPORTED.value,
            request_id=feedback.request_id,
            cause=redactor.text(feedback.label or "reported wrong")[:_MAX_CAUSE],
            note=redactor.text(feedback.note)[:_MAX_NOTE] if feedback.note else None,
            detail=redactor.value(detail),
            **base,
        )
        await self.store.write([record], [])
        self._count_written(record.kind)
        return FeedbackResult(record=record, linked=linked_via is not None, linked_via=linked_via)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="sidecar-failure-writer"
            )

    async def stop(self, timeout: float) -> None:
        """Flush what is queued within `timeout` seconds (the rest is counted as dropped), then
        close the store."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(_STOP)
            try:
                async with asyncio.timeout(max(0.0, timeout)):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            except Exception as exc:
                self._log_once("failure_writer_failed", error=repr(exc))
        left = sum(1 for item in self._drain_nowait() if isinstance(item, _Pending))
        if left:
            self._drop("shutdown", left)
            log.warning("failure_capture_flush_incomplete", dropped=left)
        with contextlib.suppress(Exception):
            await self.store.close()

    def stats(self) -> dict[str, Any]:
        return {
            "queued": self._queue.qsize(),
            "queued_bytes": self._queued_bytes,
            "written": dict(self.written),
            "dropped": dict(self.dropped),
        }

    # -- the writer ------------------------------------------------------------------------------
    async def _run(self) -> None:
        next_purge = self.clock.monotonic()
        while True:
            batch: list[_Pending] = []
            try:
                async with asyncio.timeout(self.flush_interval):
                    item = await self._queue.get()
                if isinstance(item, _Pending):
                    batch.append(item)
                while len(batch) < self.batch_size and not self._queue.empty():
                    item = self._queue.get_nowait()
                    if isinstance(item, _Pending):
                        batch.append(item)
                # Under a burst of failures (an open circuit answers fast), wait a moment for
                # more records so they share one thread hand-off and one transaction.
                if batch and not self._stopping and len(batch) < self.batch_size:
                    await self._gather(batch)
            except TimeoutError:
                pass
            if batch or self._counts:
                await self._write(batch)
            if self.clock.monotonic() >= next_purge:
                next_purge = self.clock.monotonic() + self.purge_interval
                await self._purge()
            if self._stopping and self._queue.empty():
                return

    async def _gather(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + GATHER_WINDOW
        while len(batch) < self.batch_size and not self._stopping:
            remaining = until - loop.time()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    item = await self._queue.get()
            except TimeoutError:
                return
            if isinstance(item, _Pending):
                batch.append(item)

    async def _write(self, batch: list[_Pending]) -> None:
        counts = self._take_counts()
        try:
            try:
                records = await asyncio.to_thread(self._prepare, batch) if batch else []
            except Exception as exc:
                self._drop("error", len(batch))
                self._log_once("failure_redaction_failed", error=f"{type(exc).__name__}: {exc}")
                records = []
            try:
                await self.store.write(records, counts)
            except FailureStoreError as exc:
                self._drop("store_error", len(records))
                self._restore_counts(counts)
                self._log_once("failure_store_failed", error=str(exc))
                return
            for record in records:
                self._count_written(record.kind)
        finally:
            self._queued_bytes -= sum(p.size for p in batch)

    def _prepare(self, batch: list[_Pending]) -> list[FailureRecord]:
        """Redact and cap (runs on a worker thread)."""
        out = []
        for pending in batch:
            redactor = self._redactor(pending.rules)
            record = pending.record
            out.append(
                replace(
                    record,
                    path=redactor.text(record.path),
                    cause=redactor.text(record.cause)[:_MAX_CAUSE] if record.cause else None,
                    request_excerpt=(
                        redactor.excerpt(pending.request) if pending.request is not None else None
                    ),
                    response_excerpt=(
                        redactor.excerpt(pending.response) if pending.response is not None else None
                    ),
                    detail=redactor.value(record.detail),
                )
            )
        return out

    async def _purge(self) -> None:
        config = self.config()
        if not config.enabled:
            return  # capture off: the store is not touched (not even created)
        try:
            deleted = await self.store.purge(self.clock.wall(), config.max_age, config.max_rows)
        except FailureStoreError as exc:
            self._log_once("failure_store_failed", error=str(exc))
            return
        if deleted:
            log.info("failure_records_purged", deleted=deleted)

    # -- helpers ---------------------------------------------------------------------------------
    def _enqueue(self, pending: _Pending) -> bool:
        if self._queued_bytes + pending.size > self.max_queued_bytes:
            self._drop("queue_bytes")
            return False
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            self._drop("queue_full")
            return False
        self._queued_bytes += pending.size
        return True

    def _drain_nowait(self) -> list[_Pending | _Stop]:
        items: list[_Pending | _Stop] = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, _Pending):
                self._queued_bytes -= item.size
            items.append(item)
        return items

    def _redactor(self, rules: RedactionRules) -> Redactor:
        redactor = self._redactors.get(rules)
        if redactor is None:
            if len(self._redactors) > 8:
                self._redactors.clear()
            redactor = Redactor(rules)
            self._redactors[rules] = redactor
        return redactor

    def _remember(self, ctx: RequestContext, status: int, outcome: Outcome, now: float) -> None:
        if not ctx.request_id or self.recent_size <= 0:
            return
        self._recent[ctx.request_id] = _Recent(
            time=now,
            trace_id=ctx.trace_id,
            route=ctx.route or NO_ROUTE,
            upstream=ctx.upstream,
            outcome=outcome.value,
            status=status,
            method=ctx.method,
            path=ctx.path,
            confidence=ctx.confidence,
            confidence_band=ctx.confidence_band,
            review_id=ctx.review_id,
        )
        self._recent.move_to_end(ctx.request_id)
        while len(self._recent) > self.recent_size:
            self._recent.popitem(last=False)

    def _request_excerpt(self, ctx: RequestContext) -> RawExcerpt:
        request = ctx.extra.get(CAPTURE_REQUEST)
        if not isinstance(request, ProxyRequest):
            return RawExcerpt(method=ctx.method, path=ctx.path, body_note="not read")
        data = request.body.data
        if data is None:
            declared = ctx.extra.get("request_content_length")
            return RawExcerpt(
                method=ctx.method,
                path=ctx.path,
                headers=list(request.headers),
                body_size=declared if isinstance(declared, int) else None,
                body_note="not kept: streamed (larger than the replay limit)",
            )
        return RawExcerpt(
            method=ctx.method,
            path=ctx.path,
            headers=list(request.headers),
            body=data[:_RAW_CAP] if data else None,
            body_size=len(data),
        )

    def _response_excerpt(self, ctx: RequestContext) -> RawExcerpt | None:
        """Only bodies the sidecar made or buffered are kept; a streamed answer is not copied."""
        response = ctx.extra.get(CAPTURE_RESPONSE)
        if isinstance(response, ProxyResponse):
            if isinstance(response.body, BytesBody):
                data = response.body.data
                return RawExcerpt(
                    status=response.status,
                    headers=list(response.headers),
                    body=data[:_RAW_CAP] if data else None,
                    body_size=len(data),
                )
            return RawExcerpt(
                status=response.status,
                headers=list(response.headers),
                body_note="not kept: streamed from the upstream",
            )
        err = ctx.extra.get(CAPTURE_ERROR)
        if isinstance(err, SidecarError):
            data = envelope(err, ctx)
            return RawExcerpt(
                status=error_status(err),
                headers=[("content-type", "application/json")],
                body=data[:_RAW_CAP],
                body_size=len(data),
            )
        return None

    def _take_counts(self) -> list[RequestCount]:
        counts, self._counts = self._counts, {}
        return [RequestCount(m, r, o, n) for (m, r, o), n in counts.items()]

    def _restore_counts(self, counts: list[RequestCount]) -> None:
        for c in counts:
            if len(self._counts) >= _MAX_PENDING_COUNTS:
                return
            key = (c.minute, c.route, c.outcome)
            self._counts[key] = self._counts.get(key, 0) + c.count

    def _count_written(self, kind: RecordKind) -> None:
        self.written[kind.value] = self.written.get(kind.value, 0) + 1
        self._written_metric.labels(kind.value).inc()

    def _drop(self, reason: str, n: int = 1) -> None:
        if n <= 0:
            return
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        self._dropped_metric.labels(reason).inc(n)

    def _log_once(self, event: str, **attrs: Any) -> None:
        """Log a failure of capture at most once a minute per kind (a broken disk is loud
        enough once; the drop counter keeps the count)."""
        now = self.clock.monotonic()
        last = self._last_log.get(event)
        if last is not None and now - last < _LOG_EVERY:
            return
        self._last_log[event] = now
        log.error(event, **attrs, dropped=dict(self.dropped))


def _cause(ctx: RequestContext, err: SidecarError | None) -> str | None:
    """A short description that groups well in the report's "top causes"."""
    if err is not None and err.mode == ctx.failure_mode:
        return err.message
    for event in reversed(ctx.events):
        if event.name == "validation_failed":
            return f"invalid output: {event.attrs.get('reason')}"
        if event.name == "shed":
            return f"shed: {event.attrs.get('reason')}"
        if event.name == "stream_failed" and err is not None:
            return err.message
    mode = ctx.failure_mode
    if mode == FailureMode.LOW_CONFIDENCE:
        band = ctx.confidence_band or "unknown"
        return "no usable confidence" if band == "missing" else f"confidence in the {band} band"
    if ctx.upstream_status is not None and ctx.upstream_status >= 400:
        return f"upstream answered {ctx.upstream_status}"
    if err is not None:
        return err.message
    return mode.value if mode is not None else None


def _detail(ctx: RequestContext) -> dict[str, Any]:
    names: list[str] = []
    for event in ctx.events:
        if event.name not in names:
            names.append(event.name)
        if len(names) >= _MAX_EVENTS:
            break
    detail: dict[str, Any] = {"events": names}
    if ctx.response_started:
        detail["response_started"] = True
        detail["stream_chunks"] = ctx.stream_chunks
    return detail


def _policy_config(policy: Callable[[], Policy | None]) -> Callable[[], CaptureConfig]:
    """A getter that converts the current policy's section once per policy object."""
    cache: dict[str, Any] = {"section": None, "config": CaptureConfig()}

    def get() -> CaptureConfig:
        current = policy()
        section = getattr(current, "failures", None) if current is not None else None
        if section is not cache["section"]:
            cache["section"] = section
            cache["config"] = capture_config(section)
        config: CaptureConfig = cache["config"]
        return config

    return get


def install_failure_capture(
    state: SidecarState, env: Mapping[str, str] | None = None
) -> FailureRecorder:
    """Create the app's recorder on the embedded store under `SIDECAR_STATE_DIR` (opened lazily,
    so an unusable directory only drops records) and wire it to the state and its breakers."""
    from sidecar.review.settings import (
        ReviewSettingsError,
        resolve_review_settings,
        state_dir_from_env,
    )

    store: FailureStore = SqliteFailureStore(state_dir_from_env(env) / DB_NAME)
    try:
        shared = resolve_review_settings(env)
    except ReviewSettingsError:
        shared = None  # the review queue reports the bad setting itself at start-up
    if shared is not None and shared.backend == "postgres" and shared.database_url:
        # Replicas sharing a PostgreSQL review queue share the failure store too.
        from sidecar.failures.postgres import PostgresFailureStore

        store = PostgresFailureStore(shared.database_url, schema=shared.database_schema)

    def policy() -> Policy | None:
        return state.runtime.policy if state.runtime is not None else None

    recorder = FailureRecorder(
        store, clock=state.clock, config=_policy_config(policy), registry=state.metrics.registry
    )
    state.failures = recorder
    state.breaker_listeners.append(recorder.breaker_transition)
    for breaker in state.breakers.values():
        breaker.listeners.append(recorder.breaker_transition)
    return recorder
