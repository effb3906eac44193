"""Attempt spans when a request's attempts run at once (hedging): each attempt has its own span,
an event lands on the attempt whose task emitted it, and a loser ends as `client_cancelled`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from sidecar.clock import FakeClock
from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.outcome import Outcome
from sidecar.pipeline import BytesBody, ProxyRequest, ProxyResponse
from sidecar.strategies.hedge import HedgeConfig, HedgeStrategy
from sidecar.telemetry.events import RequestTelemetry, Telemetry, run_attempt
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import Tracing

Send = Callable[[ProxyRequest], Awaitable[ProxyResponse]]


class Rig:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.metrics = Metrics()
        self.clock = FakeClock()
        env = {"SIDECAR_TRACE_SUCCESS_RATIO": "1"}
        tracing = Tracing(env, lambda: 1.0, exporter=self.exporter)
        self.telemetry = Telemetry(self.metrics, self.clock, env=env, tracing=tracing)

    def begin(self) -> tuple[RequestContext, RequestTelemetry]:
        ctx = RequestContext(
            request_id="req-1",
            route="r",
            upstream="model",
            clock=self.clock,
            started=self.clock.monotonic(),
            method="POST",
            path="/infer",
        )
        return ctx, self.telemetry.begin(ctx, {}, {"http.request.method": "POST"})

    def attempts(self) -> list[ReadableSpan]:
        self.telemetry.tracing.provider.force_flush()
        spans = [s for s in self.exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
        return sorted(spans, key=lambda s: (s.attributes or {})["sidecar.attempt"])

    def attempts_counted(self, result: str) -> float:
        for name, labels, value in self.metrics.samples():
            if name == "sidecar_upstream_attempts_total" and labels.get("result") == result:
                return value
        return 0.0


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.telemetry.tracing.provider.shutdown()


def ok() -> ProxyResponse:
    return ProxyResponse(200, [], BytesBody(b"{}"))


def transport(
    sends: list[Send],
) -> Callable[[ProxyRequest, RequestContext], Awaitable[ProxyResponse]]:
    """The terminal handler: each call is one attempt under its span, playing the next `send`."""

    async def handler(request: ProxyRequest, ctx: RequestContext) -> ProxyResponse:
        ctx.attempts += 1
        send = sends.pop(0)
        return await run_attempt(ctx, request, send, upstream="model", origin="http://m:1")

    return handler


def error_type(span: ReadableSpan) -> object:
    return (span.attributes or {}).get("error.type")


async def test_the_loser_ends_as_client_cancelled_and_the_winner_is_its_own_span(
    rig: Rig,
) -> None:
    ctx, observed = rig.begin()
    never = asyncio.Event()

    async def slow(request: ProxyRequest) -> ProxyResponse:
        await never.wait()
        return ok()

    async def fast(request: ProxyRequest) -> ProxyResponse:
        return ok()

    hedge = HedgeStrategy(HedgeConfig(delay=0.05))
    result = await hedge(ProxyRequest("POST", "/infer", []), ctx, transport([slow, fast]))
    assert result.status == 200 and ctx.attempts == 2
    observed.finish(ctx, 200, Outcome.RETRIED)
    first, second = rig.attempts()
    assert error_type(first) == FailureMode.CLIENT_CANCELLED.value
    assert error_type(second) is None
    assert (second.attributes or {})["http.response.status_code"] == 200
    assert first.end_time is not None and second.end_time is not None
    assert rig.attempts_counted("client_cancelled") == 1
    assert rig.attempts_counted("ok") == 1


async def test_an_event_lands_on_the_attempt_whose_task_emitted_it(rig: Rig) -> None:
    """The first attempt times out while the hedge is in flight: its own span says so, not the
    hedge's (which is the most recent one)."""
    ctx, observed = rig.begin()
    first_done = asyncio.Event()
    hedge_may_answer = asyncio.Event()

    async def first(request: ProxyRequest) -> ProxyResponse:
        await first_done.wait()
        return ok()

    async def second(request: ProxyRequest) -> ProxyResponse:
        first_done.set()
        await hedge_may_answer.wait()
        return ok()

    inner = transport([first, second])
    calls = 0

    async def timing_out(request: ProxyRequest, ctx: RequestContext) -> ProxyResponse:
        nonlocal calls
        calls += 1
        mine = calls
        response = await inner(request, ctx)
        if mine == 1:  # as the attempt timeout would, from the attempt's own task
            ctx.emit("attempt_timeout", timeout=0.8, phase="headers")
            hedge_may_answer.set()
            raise SidecarError(FailureMode.ATTEMPT_TIMEOUT, "no headers in time")
        return response

    hedge = HedgeStrategy(HedgeConfig(delay=0.05))
    result = await hedge(ProxyRequest("POST", "/infer", []), ctx, timing_out)
    assert result.status == 200
    observed.finish(ctx, 200, Outcome.RETRIED)
    first_span, hedge_span = rig.attempts()
    assert error_type(first_span) == FailureMode.ATTEMPT_TIMEOUT.value
    assert [e.name for e in first_span.events] == ["attempt_timeout"]
    assert error_type(hedge_span) is None and list(hedge_span.events) == []
