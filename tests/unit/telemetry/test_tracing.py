"""Deferred spans: a request's spans become SDK spans only when its trace is exported, and then
with the ids, times, flags and parent links it had while it ran; the trace context sent upstream
names the span that is exported."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sidecar.errors import FailureMode
from sidecar.telemetry.tracing import RequestTrace, Tracing

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
#: A traceparent already on the request the policy hands the transport: replaced.
STALE = ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")


class Starts(SpanProcessor):
    """Counts the SDK spans started on the provider."""

    def __init__(self) -> None:
        self.started = 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.started += 1


class Rig:
    def __init__(self, ratio: float, env: dict[str, str] | None = None) -> None:
        self.exporter = InMemorySpanExporter()
        self.decisions: list[str] = []
        self.tracing = Tracing(
            env or {},
            lambda: ratio,
            on_decision=self.decisions.append,
            exporter=self.exporter,
        )
        self.starts = Starts()
        self.tracing.provider.add_span_processor(self.starts)

    def spans(self) -> list[ReadableSpan]:
        self.tracing.provider.force_flush()
        return list(self.exporter.get_finished_spans())

    def request(
        self, headers: dict[str, str], *, failed: bool
    ) -> tuple[RequestTrace, list[tuple[str, str]]]:
        """One request with one attempt; returns its trace and the attempt's request headers."""
        observed = self.tracing.begin(headers, "POST", {"sidecar.request_id": "r"})
        attempt = observed.start_attempt(1, "model", 0.0, {"http.request.method": "POST"})
        sent = observed.inject(
            attempt, [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")]
        )
        attempt.set_attribute("http.response.status_code", 500 if failed else 200)
        observed.end_attempt(attempt, FailureMode.UPSTREAM_5XX if failed else None)
        outcome = "error" if failed else "ok"
        observed.finish({"sidecar.outcome": outcome}, None, "upstream_5xx" if failed else None)
        return observed, sent


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(0.0)
    yield r
    r.tracing.provider.shutdown()


def traceparent(headers: list[tuple[str, str]]) -> list[str]:
    (value,) = [v for k, v in headers if k == "traceparent"]
    return value.split("-")


def test_a_dropped_success_makes_no_sdk_span_and_a_failure_is_exported_whole(rig: Rig) -> None:
    rig.request({}, failed=False)
    assert rig.starts.started == 0 and rig.spans() == []
    observed, sent = rig.request({}, failed=True)
    assert rig.starts.started == 2
    server, client = sorted(rig.spans(), key=lambda s: s.kind != SpanKind.SERVER)
    assert rig.decisions == ["dropped", "exported_failure"]
    assert f"{server.context.trace_id:032x}" == observed.trace_id
    assert f"{server.context.span_id:016x}" == observed.span_id
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert client.status.status_code == StatusCode.ERROR
    assert (client.attributes or {})["http.response.status_code"] == 500
    # A new trace: the upstream got this trace's id, the attempt span's id and its flags
    # (sampled, and the random-trace-id flag of a trace id the sidecar drew).
    assert server.parent is None
    assert traceparent(sent) == [
        "00",
        observed.trace_id,
        f"{client.context.span_id:016x}",
        f"{client.context.trace_flags:02x}",
    ]
    assert traceparent(sent)[3] == "03"


def test_without_export_nothing_is_made_but_context_still_propagates() -> None:
    tracing = Tracing({"OTEL_TRACES_EXPORTER": "none"}, lambda: 1.0)
    starts = Starts()
    tracing.provider.add_span_processor(starts)
    assert not tracing.exporting
    headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "tracestate": "v=1"}
    observed = tracing.begin(headers, "POST", {})
    attempt = observed.start_attempt(1, "model", 0.0, {})
    observed.add_event("retry", {"attempt": 2})
    sent = observed.inject(attempt, [("x-a", "1"), ("TraceParent", "00-x"), ("tracestate", "a=b")])
    observed.finish({"sidecar.outcome": "error"}, None, "upstream_5xx")
    assert starts.started == 0
    assert observed.trace_id == CALLER_TRACE and observed.span_id != CALLER_SPAN
    assert sent == [
        ("x-a", "1"),
        ("traceparent", f"00-{CALLER_TRACE}-{attempt.span_id:016x}-01"),
        ("tracestate", "v=1"),
    ]
    tracing.provider.shutdown()


def test_spans_carry_the_times_they_were_recorded_at_not_the_time_of_export() -> None:
    r = Rig(1.0)
    before = time.time_ns()
    observed = r.tracing.begin({}, "POST", {"sidecar.request_id": "r"})
    attempt = observed.start_attempt(1, "model", 0.0, {"http.request.method": "POST"})
    observed.add_event("attempt_timeout", {"phase": "headers"}, on_attempt=True)
    observed.end_attempt(attempt, FailureMode.ATTEMPT_TIMEOUT)
    attempt.set_attribute("http.response.status_code", 200)  # after its end: ignored
    between = time.time_ns()
    observed.add_event("retry", {"attempt": 2, "reason": "attempt_timeout", "status": None})
    observed.finish({"sidecar.outcome": "error", "http.route": None}, "POST /v2", "x")
    observed.add_event("late", {})  # after the end: not on any span
    server, client = sorted(r.spans(), key=lambda s: s.kind != SpanKind.SERVER)
    assert server.start_time is not None and server.end_time is not None
    assert client.start_time is not None and client.end_time is not None
    assert before <= server.start_time <= client.start_time <= client.events[0].timestamp
    assert client.events[0].timestamp <= client.end_time <= between <= server.events[0].timestamp
    assert server.events[0].timestamp <= server.end_time
    assert server.name == "POST /v2" and client.name == "POST model"
    assert [e.name for e in server.events] == ["retry"]
    assert dict(server.events[0].attributes or {}) == {"attempt": 2, "reason": "attempt_timeout"}
    assert dict(client.attributes or {}) == {
        "http.request.method": "POST",
        "sidecar.failure_mode": "attempt_timeout",
        "error.type": "attempt_timeout",
    }
    assert server.status.description == "x"
    r.tracing.provider.shutdown()


def test_a_head_sampler_decides_the_flag_sent_upstream_and_whether_anything_is_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The SDK reads the sampler from the process environment, the sidecar from its own.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_off")
    r = Rig(1.0, {"OTEL_TRACES_SAMPLER": "parentbased_always_off"})
    _, sent = r.request({"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"}, failed=True)
    assert traceparent(sent)[3] == "00"
    assert r.starts.started == 0 and r.decisions == []
    sampled, sent = r.request({"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}, failed=True)
    assert traceparent(sent)[3] == "01"
    assert r.decisions == ["exported_failure"]
    server, client = sorted(r.spans(), key=lambda s: s.kind != SpanKind.SERVER)
    assert server.parent is not None and f"{server.parent.span_id:016x}" == CALLER_SPAN
    assert server.parent.is_remote and f"{server.context.span_id:016x}" == sampled.span_id
    assert f"{client.context.span_id:016x}" == traceparent(sent)[2]
    r.tracing.provider.shutdown()
