"""The sink fan-out without processes: attempt spans ended by whoever learns their outcome, span
attributes and status at the end, trace context injected, no bodies in spans, late events."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sidecar.clock import FakeClock
from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.outcome import Outcome
from sidecar.pipeline import BytesBody, ProxyRequest, ProxyResponse
from sidecar.telemetry.events import Telemetry, run_attempt
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import Tracing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class Rig:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.metrics = Metrics()
        self.clock = FakeClock()
        env = {"SIDECAR_TRACE_SUCCESS_RATIO": "1"}
        tracing = Tracing(env, lambda: 1.0, exporter=self.exporter)
        self.telemetry = Telemetry(self.metrics, self.clock, env=env, tracing=tracing)

    def begin(self, route: str = "fraud") -> RequestContext:
        ctx = RequestContext(
            request_id="req-1",
            route=route,
            upstream="model",
            clock=self.clock,
            started=self.clock.monotonic(),
            method="POST",
            path="/infer",
        )
        headers = {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}
        self.telemetry.begin(ctx, headers, {"http.request.method": "POST"})
        return ctx

    def spans(self) -> list[ReadableSpan]:
        self.telemetry.tracing.provider.force_flush()
        return list(self.exporter.get_finished_spans())

    def value(self, name: str, **labels: str) -> float:
        for n, ls, v in self.metrics.samples():
            if n == name and ls == labels:
                return v
        return 0.0


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.telemetry.tracing.provider.shutdown()


def request() -> ProxyRequest:
    return ProxyRequest(
        "POST", "/infer?api_key=k", [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")]
    )


async def attempt(
    ctx: RequestContext, send: Any, upstream: str = "model"
) -> ProxyResponse | BaseException:
    ctx.attempts += 1
    try:
        result: ProxyResponse = await run_attempt(
            ctx, request(), send, upstream=upstream, origin="http://127.0.0.1:8080"
        )
        return result
    except (SidecarError, asyncio.CancelledError) as exc:
        return exc


def finish(ctx: RequestContext, status: int, outcome: Outcome) -> None:
    observed = ctx.sink
    observed.finish(ctx, status, outcome)  # type: ignore[attr-defined]


async def test_retried_timeout_then_success(rig: Rig) -> None:
    ctx = rig.begin()
    assert ctx.trace_id == TRACE
    seen: list[list[tuple[str, str]]] = []

    async def hang(req: ProxyRequest) -> ProxyResponse:
        seen.append(req.headers)
        await asyncio.sleep(10)
        raise AssertionError

    task = asyncio.ensure_future(attempt(ctx, hang))
    await asyncio.sleep(0)
    task.cancel()  # what the attempt timeout does
    await asyncio.gather(task, return_exceptions=True)
    ctx.emit("attempt_timeout", timeout=0.2, phase="headers")
    ctx.emit("retry", attempt=2, delay=0.01, reason="attempt_timeout", status=None)
    ctx.retries = 1

    async def ok(req: ProxyRequest) -> ProxyResponse:
        seen.append(req.headers)
        return ProxyResponse(200, [], BytesBody(b"{}"))

    await attempt(ctx, ok)
    finish(ctx, 200, Outcome.RETRIED)

    spans = {s.name: s for s in rig.spans()}
    server = spans["POST"]
    first, second = sorted(
        (s for s in rig.spans() if s.kind == SpanKind.CLIENT),
        key=lambda s: s.attributes["sidecar.attempt"],  # type: ignore[index]
    )
    assert server.parent is not None and server.parent.span_id == 0x00F067AA0BA902B7
    assert first.parent is not None and first.parent.span_id == server.context.span_id
    assert first.attributes["sidecar.failure_mode"] == "attempt_timeout"  # type: ignore[index]
    assert first.status.status_code == StatusCode.ERROR
    assert [e.name for e in first.events] == ["attempt_timeout"]
    assert second.status.status_code == StatusCode.UNSET
    assert second.attributes["http.request.resend_count"] == 1  # type: ignore[index]
    assert second.attributes["url.full"] == "http://127.0.0.1:8080/infer"  # type: ignore[index]
    assert [e.name for e in server.events] == ["retry"]
    assert server.attributes["sidecar.outcome"] == "retried"  # type: ignore[index]
    assert server.attributes["sidecar.retry.count"] == 1  # type: ignore[index]
    assert server.status.status_code == StatusCode.UNSET
    # Each attempt carried its own span as the parent, the caller's traceparent replaced.
    for headers, span in zip(seen, (first, second), strict=True):
        (traceparent,) = [v for k, v in headers if k == "traceparent"]
        assert traceparent.split("-")[1:3] == [TRACE, f"{span.context.span_id:016x}"]
    assert rig.value("sidecar_upstream_attempts_total", upstream="model", result="ok") == 1
    assert (
        rig.value("sidecar_upstream_attempts_total", upstream="model", result="attempt_timeout")
        == 1
    )
    assert rig.value("sidecar_requests_total", route="fraud", outcome="retried") == 1


async def test_failure_status_error_and_no_body_in_spans(rig: Rig) -> None:
    ctx = rig.begin()

    async def bad(req: ProxyRequest) -> ProxyResponse:
        return ProxyResponse(200, [], BytesBody(b'{"score": "secret-value"}'))

    await attempt(ctx, bad)
    reason = "the model's answer violates the schema at score: 'secret-value' is not a number"
    ctx.emit("validation_failed", reason=reason)
    ctx.failure_mode = FailureMode.INVALID_OUTPUT
    finish(ctx, 502, Outcome.ERROR)
    spans = rig.spans()
    assert "secret-value" not in repr(
        [(s.attributes, [e.attributes for e in s.events]) for s in spans]
    )
    (client,) = [s for s in spans if s.kind == SpanKind.CLIENT]
    (event,) = client.events
    assert event.attributes == {"reason": "the model's answer violates the schema at score"}
    assert client.attributes["sidecar.failure_mode"] == "invalid_output"  # type: ignore[index]
    (server,) = [s for s in spans if s is not client]
    assert server.status.status_code == StatusCode.ERROR
    assert server.status.description == "invalid_output"
    assert server.attributes["error.type"] == "invalid_output"  # type: ignore[index]
    assert rig.value("sidecar_failures_total", route="fraud", mode="invalid_output") == 1


async def test_a_failing_attempt_and_a_late_event_are_handled(rig: Rig) -> None:
    ctx = rig.begin()

    async def refused(req: ProxyRequest) -> ProxyResponse:
        raise SidecarError(FailureMode.CONNECT_ERROR, "refused")

    result = await attempt(ctx, refused)
    assert isinstance(result, SidecarError)
    ctx.failure_mode = FailureMode.CONNECT_ERROR
    finish(ctx, 502, Outcome.ERROR)
    finish(ctx, 502, Outcome.ERROR)  # once only
    ctx.emit("retry", attempt=2, reason="connect_error")  # after the end: counted, not traced
    spans = rig.spans()
    assert len(spans) == 2
    assert rig.value("sidecar_requests_total", route="fraud", outcome="error") == 1
    assert rig.value("sidecar_retries_total", route="fraud", reason="connect_error") == 1


async def test_client_errors_are_not_span_errors(rig: Rig) -> None:
    ctx = rig.begin(route="")
    ctx.failure_mode = FailureMode.CLIENT_ERROR
    finish(ctx, 404, Outcome.ERROR)
    (server,) = rig.spans()
    assert server.status.status_code == StatusCode.UNSET
    assert server.attributes["error.type"] == "client_error"  # type: ignore[index]
    assert rig.value("sidecar_failures_total", route="(none)", mode="client_error") == 1


def test_success_ratio_env_beats_policy_and_a_bad_env_value_falls_back() -> None:
    from sidecar.policy.loader import parse_policy

    policy = parse_policy(
        {
            "upstreams": {"m": {"url": "http://127.0.0.1:1"}},
            "routes": [{"name": "r"}],
            "tracing": {"success_ratio": 0.5},
        }
    )
    off = {"OTEL_TRACES_EXPORTER": "none"}

    def ratio(env: dict[str, str]) -> float:
        telemetry = Telemetry(Metrics(), FakeClock(), policy=lambda: policy, env={**off, **env})
        value = telemetry.success_ratio()
        telemetry.tracing.provider.shutdown()
        return value

    assert ratio({}) == 0.5
    assert ratio({"SIDECAR_TRACE_SUCCESS_RATIO": "0.25"}) == 0.25
    assert ratio({"SIDECAR_TRACE_SUCCESS_RATIO": "lots"}) == 0.5
    no_policy = Telemetry(Metrics(), FakeClock(), env=off)
    assert no_policy.success_ratio() == 0.1
    assert not no_policy.tracing.exporting
