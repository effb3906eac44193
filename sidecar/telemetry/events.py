"""The telemetry sink: strategy events fanned out to span events, metrics, alerts and log lines.

`Telemetry` is the per-app bundle (tracing, metrics, alerts, the event-loop lag monitor), kept in
`SidecarState.telemetry`. For each proxied request the proxy calls `Telemetry.begin`, which starts
the server span and returns a `RequestTelemetry`: it becomes the request's `ctx.sink` (so every
`ctx.emit(...)` of a strategy lands here), wraps each upstream attempt (`run_attempt`, called by
the policy's terminal transport: the attempt's client span and W3C trace context injection), and
at `finish` ends the spans, records the request's metrics and feeds the alert rules.

Telemetry never changes what the caller gets: every path here is guarded, and a failure in it is
logged once and otherwise ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import structlog

from sidecar.classify import classify_error, classify_status
from sidecar.clock import Clock
from sidecar.context import RequestContext, ResilienceEvent
from sidecar.errors import FailureMode, SidecarError
from sidecar.outcome import Outcome
from sidecar.pipeline import ProxyRequest, ProxyResponse
from sidecar.policy.schema import Policy
from sidecar.strategies.breaker import CircuitBreaker
from sidecar.strategies.hedge import HEDGE_LOST
from sidecar.telemetry.alerts import AlertEngine
from sidecar.telemetry.logging import get_logger
from sidecar.telemetry.metrics import Metrics, request_failed, transition_label
from sidecar.telemetry.sampling import DEFAULT_SUCCESS_RATIO, env_success_ratio
from sidecar.telemetry.tracing import AttemptSpan, RequestTrace, Tracing

__all__ = ["TELEMETRY_KEY", "RequestTelemetry", "Telemetry", "run_attempt"]

#: Where the request's `RequestTelemetry` sits in `ctx.extra` (the transport looks it up).
TELEMETRY_KEY = "sidecar.telemetry"
#: Set by the proxy: seconds from arrival to the first body byte written to the caller.
FIRST_BYTE_KEY = "first_byte_sent"

#: Log levels of strategy events; unknown events log at info.
_LEVELS = {
    "retry": "info",
    "retry_skipped": "info",
    "budget_refused": "warning",
    "attempt_timeout": "warning",
    "deadline_exceeded": "warning",
    "circuit_opened": "warning",
    "circuit_half_open": "info",
    "circuit_closed": "info",
    "shed": "warning",
    "fallback": "warning",
    "validation_failed": "warning",
    "escalated": "info",
    "client_cancelled": "info",
    "stream_failed": "warning",
}
#: Events that close the open attempt with a failure mode.
_ATTEMPT_ENDING = {
    "validation_failed": FailureMode.INVALID_OUTPUT,
    "deadline_exceeded": FailureMode.DEADLINE_EXCEEDED,
    "client_cancelled": FailureMode.CLIENT_CANCELLED,
}
#: Events recorded on the attempt's span rather than the server span.
_ON_ATTEMPT = frozenset({"attempt_timeout", "validation_failed"})
#: Final failure modes that belong to the last attempt when it is still open at the end.
_LATE_ATTEMPT_MODES = frozenset(
    {
        FailureMode.STREAM_INTERRUPTED,
        FailureMode.STREAM_STALLED,
        FailureMode.FIRST_BYTE_TIMEOUT,
        FailureMode.DEADLINE_EXCEEDED,
        FailureMode.CLIENT_CANCELLED,
        FailureMode.INVALID_OUTPUT,
    }
)
_TRANSITION_EVENTS = {
    "open": "circuit_opened",
    "half-open": "circuit_half_open",
    "closed": "circuit_closed",
}
_CALLER_MODES = frozenset({FailureMode.CLIENT_ERROR, FailureMode.CLIENT_CANCELLED})
_BAD_OUTCOMES = frozenset({Outcome.ERROR, Outcome.FALLBACK, Outcome.REJECTED})


def _mode(value: Any) -> FailureMode | None:
    try:
        return FailureMode(str(value))
    except ValueError:
        return None


def _safe_attrs(name: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Event attributes fit for spans and logs: no bodies. A schema violation's message quotes
    the offending value from the model's answer, so only its location is kept."""
    out = dict(attrs)
    reason = out.get("reason")
    if name == "validation_failed" and isinstance(reason, str):
        marker = "violates the schema at "
        if marker in reason:
            head, _, rest = reason.partition(marker)
            out["reason"] = head + marker + rest.split(":", 1)[0]
        out["reason"] = str(out["reason"])[:200]
    return out


class Telemetry:
    """Tracing, metrics, alerts and event logging for one app."""

    def __init__(
        self,
        metrics: Metrics,
        clock: Clock,
        *,
        policy: Callable[[], Policy | None] = lambda: None,
        route_template: Callable[[str], str | None] = lambda route: None,
        env: Mapping[str, str] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        env = dict(env if env is not None else os.environ)
        self.metrics = metrics
        self.clock = clock
        self.log = get_logger("sidecar.events")
        self._policy = policy
        self._route_template = route_template
        try:
            self._env_ratio = env_success_ratio(env)
        except ValueError as exc:
            self.log.error("tracing_config", message=f"{exc}; using the policy's ratio")
            self._env_ratio = None
        self.tracing = tracing or Tracing(
            env,
            self.success_ratio,
            on_decision=metrics.trace_decision,
            warn=lambda message: self.log.warning("tracing_config", message=message),
        )
        self.alerts = AlertEngine(
            lambda: p.alerts if (p := policy()) is not None else None,
            clock,
            metrics,
            get_logger("sidecar.alerts"),
            env,
        )
        self._lag_task: asyncio.Task[None] | None = None
        self._failed_once = False

    def success_ratio(self) -> float:
        if self._env_ratio is not None:
            return self._env_ratio
        policy = self._policy()
        return policy.tracing.success_ratio if policy is not None else DEFAULT_SUCCESS_RATIO

    def route_template(self, route: str) -> str | None:
        return self._route_template(route) if route else None

    # -- requests ------------------------------------------------------------------------------
    def begin(
        self, ctx: RequestContext, headers: Mapping[str, str], attrs: Mapping[str, Any]
    ) -> RequestTelemetry:
        """Start the request's server span (parent: the caller's `traceparent`) and become its
        sink; sets `ctx.trace_id`/`ctx.span_id`."""
        trace = self.tracing.begin(
            headers, ctx.method, {**attrs, "sidecar.request_id": ctx.request_id}
        )
        return RequestTelemetry(self, ctx, trace)

    def guard_failed(self, where: str, exc: BaseException) -> None:
        if not self._failed_once:
            self._failed_once = True
            self.log.error("telemetry_failed", where=where, error=repr(exc))

    # -- app-level inputs ----------------------------------------------------------------------
    def breaker_transition(
        self, breaker: CircuitBreaker, old: str, new: str, ctx: RequestContext | None
    ) -> None:
        """A `CircuitBreaker` listener: metrics, alerts, and a log line for transitions no
        request saw (an operator forcing the breaker, a probe timer)."""
        try:
            self.metrics.breaker_transition(breaker, old, new, ctx)
            self.alerts.breaker_transition(breaker, old, new, ctx)
            if ctx is None:
                name = _TRANSITION_EVENTS.get(new, "circuit_" + transition_label(new))
                getattr(self.log, _LEVELS.get(name, "info"))(
                    name, upstream=breaker.name, **{"from": old}
                )
        except Exception as exc:
            self.guard_failed("breaker_transition", exc)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._lag_task = asyncio.get_running_loop().create_task(self._watch_loop_lag())
        await self.alerts.start()

    async def _watch_loop_lag(self, interval: float = 0.5) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(interval)
            self.metrics.observe_loop_lag(loop.time() - started - interval)

    async def close(self, timeout: float) -> None:
        """Stop background work and flush traces, all within `timeout` seconds."""
        deadline = self.clock.monotonic() + max(timeout, 0.0)
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
        await self.alerts.close(min(1.0, max(0.0, timeout / 4)))
        left = max(0.05, deadline - self.clock.monotonic())
        if not await self.tracing.shutdown(left):
            self.log.warning("trace_flush_incomplete", waited=round(left, 3))


class RequestTelemetry:
    """One request's telemetry; the request's event sink (`ctx.sink`)."""

    def __init__(self, owner: Telemetry, ctx: RequestContext, trace: RequestTrace) -> None:
        self.owner = owner
        self.trace = trace
        ctx.trace_id = trace.trace_id
        ctx.span_id = trace.span_id
        ctx.sink = self
        ctx.extra[TELEMETRY_KEY] = self
        self._tokens = structlog.contextvars.bind_contextvars(
            trace_id=trace.trace_id, span_id=trace.span_id, request_id=ctx.request_id
        )
        self._finished = False

    # -- the sink ------------------------------------------------------------------------------
    def __call__(self, event: ResilienceEvent, ctx: RequestContext | None) -> None:
        try:
            self._event(event, ctx)
        except Exception as exc:
            self.owner.guard_failed(f"event {event.name}", exc)

    def _event(self, event: ResilienceEvent, ctx: RequestContext | None) -> None:
        name = event.name
        attrs = _safe_attrs(name, event.attrs)
        trace = self.trace
        if not self._finished:  # a late event (a background task) is logged and counted only
            trace.add_event(name, attrs, on_attempt=name in _ON_ATTEMPT)
        attempt = None if self._finished else trace.open_attempt()
        if attempt is not None:
            if name == "attempt_timeout":
                phase = attrs.get("phase")
                mode = (
                    FailureMode.FIRST_BYTE_TIMEOUT
                    if phase == "first_byte"
                    else FailureMode.ATTEMPT_TIMEOUT
                )
                self._end_attempt(attempt, mode)
            elif name == "retry":
                self._end_attempt(attempt, _mode(attrs.get("reason")))
            elif name in _ATTEMPT_ENDING and (attempt.interrupted or name != "deadline_exceeded"):
                self._end_attempt(attempt, _ATTEMPT_ENDING[name])
        route = ctx.route if ctx is not None else ""
        self.owner.metrics.observe_event(name, route, event.attrs)
        if name == "escalated":
            self.owner.alerts.record_escalation(route)
        fields: dict[str, Any] = {
            "route": route or None,
            "upstream": (ctx.upstream or None) if ctx is not None else None,
            "trace_id": trace.trace_id,
            "span_id": trace.span_id,
        }
        # The event's own attributes win (a breaker event names the breaker as `upstream`).
        fields.update((k, v) for k, v in attrs.items() if k not in ("event", "level"))
        getattr(self.owner.log, _LEVELS.get(name, "info"))(name, **fields)

    # -- attempts ------------------------------------------------------------------------------
    async def attempt(
        self,
        ctx: RequestContext,
        request: ProxyRequest,
        send: Callable[[ProxyRequest], Awaitable[ProxyResponse]],
        upstream: str,
        origin: str,
    ) -> ProxyResponse:
        try:
            for earlier in self.trace.attempts:
                # An attempt that answered with a failure status is over once another starts
                # (a fallback model after a 5xx, say); one still waiting may be a hedge.
                if not earlier.ended and earlier.status is not None and earlier.mode is not None:
                    self._end_attempt(earlier)
            span = self._start_attempt(ctx, request, upstream, origin)
            request = dataclasses.replace(request, headers=self.trace.inject(span, request.headers))
        except Exception as exc:
            self.owner.guard_failed("attempt", exc)
            return await send(request)
        try:
            response = await send(request)
        except SidecarError as err:
            self._end_attempt(span, err.mode)
            raise
        except asyncio.CancelledError as exc:
            if exc.args and exc.args[0] == HEDGE_LOST:
                # Another attempt of the same request answered first: cancelled by us.
                self._end_attempt(span, FailureMode.CLIENT_CANCELLED)
                raise
            # A timeout, the deadline or the caller: the event that follows (or the end of the
            # request) names it and ends the span.
            span.interrupted = True
            raise
        except Exception as exc:
            self._end_attempt(span, classify_error(exc))
            raise
        span.status = response.status
        span.set_attribute("http.response.status_code", response.status)
        span.mode = classify_status(response.status)
        return response

    def _start_attempt(
        self, ctx: RequestContext, request: ProxyRequest, upstream: str, origin: str
    ) -> AttemptSpan:
        parts = urlsplit(origin)
        path = request.path_qs.split("?", 1)[0]
        attrs: dict[str, Any] = {
            "http.request.method": request.method,
            "server.address": parts.hostname,
            "server.port": parts.port or (443 if parts.scheme == "https" else 80),
            "url.full": f"{parts.scheme}://{parts.netloc}{path}",
            "sidecar.route": ctx.route or None,
            "sidecar.upstream": upstream,
            "sidecar.attempt": ctx.attempts,
            "sidecar.breaker.state": ctx.breaker_state,
        }
        if ctx.attempts > 1:
            attrs["http.request.resend_count"] = ctx.attempts - 1
        return self.trace.start_attempt(ctx.attempts, upstream, ctx.clock.monotonic(), attrs)

    def _end_attempt(self, attempt: AttemptSpan, mode: FailureMode | None = None) -> None:
        if attempt.ended:
            return
        self.trace.end_attempt(attempt, mode)
        seconds = self.owner.clock.monotonic() - attempt.started
        result = attempt.mode.value if attempt.mode is not None else "ok"
        self.owner.metrics.observe_attempt(attempt.upstream, result, seconds)

    # -- the end -------------------------------------------------------------------------------
    def finish(self, ctx: RequestContext, status: int, outcome: Outcome) -> None:
        """End the request's spans, record its metrics and feed the alert rules (once)."""
        if self._finished:
            return
        self._finished = True
        try:
            self._finish(ctx, status, outcome)
        except Exception as exc:
            self.owner.guard_failed("finish", exc)
        finally:
            structlog.contextvars.reset_contextvars(**self._tokens)

    def _finish(self, ctx: RequestContext, status: int, outcome: Outcome) -> None:
        mode = ctx.failure_mode
        last = self.trace.open_attempt()
        if last is not None and mode in _LATE_ATTEMPT_MODES and last is self.trace.attempts[-1]:
            self._end_attempt(last, mode)
        for attempt in self.trace.attempts:
            self._end_attempt(attempt)
        duration = ctx.elapsed()
        first_byte = ctx.extra.get(FIRST_BYTE_KEY)
        first_byte = float(first_byte) if isinstance(first_byte, int | float) else None
        template = self.owner.route_template(ctx.route)
        attrs: dict[str, Any] = {
            "http.route": template,
            "sidecar.route": ctx.route or None,
            "sidecar.upstream": ctx.upstream or None,
            "sidecar.outcome": outcome.value,
            "sidecar.failure_mode": mode.value if mode else None,
            "error.type": mode.value if mode else None,
            "sidecar.attempt": ctx.attempts,
            "sidecar.retry.count": ctx.retries,
            "sidecar.retry.budget_refused": ctx.budget_refused or None,
            "sidecar.breaker.state": ctx.breaker_state,
            "sidecar.fallback.kind": ctx.fallback_kind,
            "sidecar.confidence": ctx.confidence,
            "sidecar.confidence.band": ctx.confidence_band,
            "sidecar.review.id": ctx.review_id,
            "sidecar.upstream.duration_seconds": round(ctx.upstream_seconds, 6),
            "sidecar.time_to_first_byte_seconds": round(first_byte, 6)
            if first_byte is not None
            else None,
        }
        if status and mode != FailureMode.CLIENT_CANCELLED:
            attrs["http.response.status_code"] = status
        if ctx.stream_chunks:
            attrs["sidecar.stream.chunks"] = ctx.stream_chunks
            attrs["sidecar.stream.max_gap_seconds"] = round(ctx.stream_max_gap, 6)
        error = None
        if (outcome in _BAD_OUTCOMES and mode not in _CALLER_MODES) or status >= 500:
            error = mode.value if mode else f"status {status}"
        name = f"{ctx.method} {template}" if template else ctx.method
        self.trace.finish(attrs, name, error)
        self.owner.metrics.observe_request(ctx, outcome, duration, first_byte)
        self.owner.alerts.record_request(ctx.route, request_failed(mode))


async def run_attempt(
    ctx: RequestContext,
    request: ProxyRequest,
    send: Callable[[ProxyRequest], Awaitable[ProxyResponse]],
    *,
    upstream: str,
    origin: str,
) -> ProxyResponse:
    """Run one upstream attempt under its client span, with the trace context injected into the
    request's headers. Without telemetry on the request (unit tests) it just sends."""
    observed = ctx.extra.get(TELEMETRY_KEY)
    if not isinstance(observed, RequestTelemetry):
        return await send(request)
    return await observed.attempt(ctx, request, send, upstream, origin)
