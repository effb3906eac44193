"""Failure-biased sampling: every non-plain trace is exported whole, plain successes by trace id."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode

from sidecar.telemetry.sampling import (
    FailureBiasedProcessor,
    env_success_ratio,
    success_selected,
)


class Rig:
    def __init__(self, ratio: float, **kwargs: int) -> None:
        self.exporter = InMemorySpanExporter()
        self.decisions: list[str] = []
        self.ratio = ratio
        self.processor = FailureBiasedProcessor(
            SimpleSpanProcessor(self.exporter),
            lambda: self.ratio,
            on_decision=self.decisions.append,
            **kwargs,
        )
        self.provider = TracerProvider(sampler=ALWAYS_ON, shutdown_on_exit=False)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("test")

    def request(
        self, trace_low: int, *, outcome: str = "ok", mode: str | None = None, error: bool = False
    ) -> int:
        """A server span with one attempt child, ended child first; returns the trace id."""
        parent = trace.set_span_in_context(
            trace.NonRecordingSpan(
                trace.SpanContext(
                    trace_id=(7 << 64) | trace_low,
                    span_id=0x1234,
                    is_remote=True,
                    trace_flags=trace.TraceFlags(1),
                )
            )
        )
        server = self.tracer.start_span(
            "POST /", context=parent, kind=SpanKind.SERVER, attributes={"sidecar.request_id": "r"}
        )
        child = self.tracer.start_span(
            "POST model", context=trace.set_span_in_context(server), kind=SpanKind.CLIENT
        )
        child.end()
        server.set_attribute("sidecar.outcome", outcome)
        if mode:
            server.set_attribute("sidecar.failure_mode", mode)
        if error:
            server.set_status(Status(StatusCode.ERROR, "x"))
        server.end()
        return server.get_span_context().trace_id

    def exported_traces(self) -> set[int]:
        return {s.context.trace_id for s in self.exporter.get_finished_spans() if s.context}


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(0.25)
    yield r
    r.provider.shutdown()


STEP = 1 << 60


def test_success_selected_is_tracidratiobased_rule() -> None:
    sampler = TraceIdRatioBased(0.25)
    for i in range(16):
        trace_id = (5 << 64) | (i * STEP)
        expected = sampler.should_sample(None, trace_id, "x").decision.is_sampled()
        assert success_selected(trace_id, 0.25) is expected is (i < 4)
    assert success_selected(123, 1.0) and not success_selected(0, 0.0)


def test_plain_successes_follow_the_ratio_exactly(rig: Rig) -> None:
    ids = [rig.request(i * STEP) for i in range(16)]
    assert rig.exported_traces() == set(ids[:4])
    assert len(rig.exporter.get_finished_spans()) == 8  # whole traces: server and attempt
    assert rig.decisions.count("exported_success") == 4
    assert rig.decisions.count("dropped") == 12


@pytest.mark.parametrize(
    "kwargs",
    [
        {"outcome": "error", "mode": "attempt_timeout", "error": True},
        {"outcome": "fallback", "mode": "connect_error"},
        {"outcome": "escalated", "mode": "low_confidence"},
        {"outcome": "rejected", "mode": "low_confidence", "error": True},
        {"outcome": "retried"},
        {"outcome": "error", "mode": "client_cancelled"},
    ],
)
def test_every_non_plain_request_is_exported_whatever_the_ratio(
    rig: Rig, kwargs: dict[str, object]
) -> None:
    rig.ratio = 0.0
    trace_id = rig.request(15 * STEP, **kwargs)  # type: ignore[arg-type]
    assert rig.exported_traces() == {trace_id}
    assert rig.decisions == ["exported_failure"]


def test_the_ratio_is_read_at_each_decision(rig: Rig) -> None:
    rig.ratio = 0.0
    first = rig.request(0)
    rig.ratio = 1.0
    second = rig.request(15 * STEP)
    assert rig.exported_traces() == {second} and first != second


def test_a_trace_decided_up_front_passes_straight_through(rig: Rig) -> None:
    """What a deferred trace does: `decide` first (counted once), its spans made afterwards."""
    rig.ratio = 0.0
    early = rig.tracer.start_span("early", context=None)  # buffered, as it ends undecided
    early.end()
    trace_id = early.get_span_context().trace_id
    assert rig.exporter.get_finished_spans() == ()
    assert rig.processor.decide(trace_id, plain=False)
    assert [s.name for s in rig.exporter.get_finished_spans()] == ["early"]
    late = rig.tracer.start_span("late", context=trace.set_span_in_context(early))
    late.end()  # follows its trace's decision, not buffered again
    assert [s.name for s in rig.exporter.get_finished_spans()] == ["early", "late"]
    assert not rig.processor.decide((7 << 64) | (15 * STEP), plain=True)
    assert rig.decisions == ["exported_failure", "dropped"]


def test_buffers_are_bounded() -> None:
    r = Rig(1.0, max_traces=2, max_spans=1)
    tracer = r.tracer
    # Three traces open at once (children ended, no server span yet): the oldest is evicted.
    for _ in range(3):
        tracer.start_span("child", context=None).end()
    assert r.decisions == ["evicted"]
    r.provider.shutdown()


def test_env_ratio() -> None:
    assert env_success_ratio({}) is None
    assert env_success_ratio({"SIDECAR_TRACE_SUCCESS_RATIO": "0.5"}) == 0.5
    with pytest.raises(ValueError, match="between 0 and 1"):
        env_success_ratio({"SIDECAR_TRACE_SUCCESS_RATIO": "2"})
