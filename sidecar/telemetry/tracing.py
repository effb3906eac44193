"""OpenTelemetry tracing for one app: a tracer provider of its own (never the process global),
OTLP export configured by the standard `OTEL_*` variables, and the spans of one request.

One server span per request (HTTP semantic conventions, `sidecar.*` attributes, status ERROR when
the caller did not get a good answer) and one client child span per upstream attempt (attempt
number, upstream, status, failure mode). W3C `traceparent`/`tracestate` are extracted from the
caller and injected into every attempt's request, so the model server's spans join the trace.
Strategy events become span events (`sidecar.telemetry.events` routes them here). Streams are
summarised on the server span (time to first byte, chunks, largest gap), never an event per chunk.
Bodies, queries and headers are never recorded.

Export: OTLP over HTTP/protobuf by default (`OTEL_EXPORTER_OTLP_PROTOCOL=grpc` needs the optional
`opentelemetry-exporter-otlp-proto-grpc`), turned on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`..._TRACES_ENDPOINT`) is set or `OTEL_TRACES_EXPORTER=otlp`; `OTEL_TRACES_EXPORTER=none` or
`OTEL_SDK_DISABLED=true` turn it off. Spans pass through the failure-biased sampler
(`sidecar.telemetry.sampling`) into a `BatchSpanProcessor` whose queue is bounded
(`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048; full means dropped, never waiting), so an unreachable
collector never slows or changes a response. `shutdown(timeout)` flushes in a daemon thread and
stops waiting after `timeout`, so a dead collector cannot hold up the drain.

Spans are materialized late. While the request runs, `RequestTrace` and `AttemptSpan` only note
what a span needs (name, kind, ids, start and end times, raw attributes, timestamped events,
status); the ids are chosen up front, so `x-trace-id`, the log lines and the `traceparent` sent
upstream carry them from the start. At `RequestTrace.finish` the tail decision is made (see
`sidecar.telemetry.sampling`) and only a trace that is exported becomes real SDK spans, started
and ended with the recorded times, ids (through `PresetIdGenerator`) and parent links, so a
collector receives exactly what spans created as the request ran would have held. A trace that is
dropped, and every trace when export is off, costs no SDK span at all.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, Sampler
from opentelemetry.trace import SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar.errors import FailureMode
from sidecar.telemetry.sampling import FailureBiasedProcessor, is_plain_success

__all__ = ["AttemptSpan", "PresetIdGenerator", "RequestTrace", "Tracing", "build_exporter"]

SERVICE_NAME = "ai-resilience-sidecar"
_HEADERS = ("traceparent", "tracestate")
#: A span with no parent. Never None: the SDK would then look for a span in the ambient context.
_ROOT = Context()

AttrValue = str | bool | int | float
#: (name, attributes as given, time in ns) of a span event.
EventRecord = tuple[str, Mapping[str, Any], int]

#: The attempt the current asyncio task started last. With hedging two attempts of one request
#: run at once, each in its own task: an event (a timeout, say) then lands on its own attempt.
#: A per-task pointer (tasks copy the context), not shared state.
_TASK_ATTEMPT: ContextVar[AttemptSpan | None] = ContextVar("sidecar_attempt", default=None)


def _attr(value: Any) -> AttrValue | None:
    if value is None:
        return None
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def clean_attrs(attrs: Mapping[str, Any]) -> dict[str, AttrValue]:
    """OpenTelemetry accepts str, bool, int and float: drop None, stringify the rest."""
    out: dict[str, AttrValue] = {}
    for key, value in attrs.items():
        cleaned = _attr(value)
        if cleaned is not None:
            out[key] = cleaned
    return out


def build_exporter(env: Mapping[str, str], warn: Callable[[str], None]) -> SpanExporter | None:
    """The span exporter the `OTEL_*` variables ask for, or None when export is off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    names = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not names:
        names = "otlp" if endpoint else "none"
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    if "none" in chosen or not chosen:
        return None
    if "otlp" not in chosen:
        if "console" in chosen:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            # stdout carries the JSON log lines; spans go to stderr.
            return ConsoleSpanExporter(out=sys.stderr)
        warn(f"OTEL_TRACES_EXPORTER={names!r} is not supported (otlp, console, none)")
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            warn(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the opentelemetry-exporter-otlp-proto-grpc "
                "package (pip install 'ai-resilience-sidecar[grpc]'); traces are not exported"
            )
            return None
        exporter: SpanExporter = GrpcExporter()
        return exporter
    if protocol != "http/protobuf":
        warn(f"OTLP protocol {protocol!r} is not supported; using http/protobuf")
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        warn(
            "the opentelemetry-exporter-otlp-proto-http package is missing; traces are not exported"
        )
        return None
    return OTLPSpanExporter()


def _resource() -> Resource:
    resource = Resource.create()
    name = str(resource.attributes.get("service.name", ""))
    if not name or name.startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    return resource


def _random_id(bits: int) -> int:
    """A random non-zero id of `bits` bits (the SDK's `RandomIdGenerator` rule)."""
    while True:
        value = random.getrandbits(bits)
        if value:
            return value


class PresetIdGenerator(IdGenerator):
    """Hands the tracer the ids a `RequestTrace` chose before its spans existed: set `trace_id`
    and `span_id` right before `start_span` (one materialization at a time, on the event loop);
    each is used once, and unset ones are random."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_trace_id(self) -> int:
        value, self.trace_id = self.trace_id, 0
        return value or _random_id(128)

    def generate_span_id(self) -> int:
        value, self.span_id = self.span_id, 0
        return value or _random_id(64)

    def is_trace_id_random(self) -> bool:
        return True  # preset or not, every trace id it hands out was drawn at random


class Tracing:
    """The app's tracer provider, exporter and failure-biased sampler."""

    def __init__(
        self,
        env: Mapping[str, str],
        success_ratio: Callable[[], float],
        *,
        on_decision: Callable[[str], None] | None = None,
        warn: Callable[[str], None] = lambda message: None,
        exporter: SpanExporter | None = None,
    ) -> None:
        # No OTEL_TRACES_SAMPLER: record everything, so the tail decision sees every failure.
        sampler = None if env.get("OTEL_TRACES_SAMPLER") else ALWAYS_ON
        self.ids = PresetIdGenerator()
        self.provider = TracerProvider(
            sampler=sampler, resource=_resource(), shutdown_on_exit=False, id_generator=self.ids
        )
        #: The user's head sampler, asked once per request when it begins (see `begin`).
        self.head: Sampler | None = self.provider.sampler if sampler is None else None
        self.exporter = exporter if exporter is not None else build_exporter(env, warn)
        self.processor: FailureBiasedProcessor | None = None
        if self.exporter is not None:
            self.processor = FailureBiasedProcessor(
                BatchSpanProcessor(self.exporter), success_ratio, on_decision=on_decision
            )
            self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("sidecar")
        self.propagator = TraceContextTextMapPropagator()

    @property
    def exporting(self) -> bool:
        return self.processor is not None

    def begin(
        self, headers: Mapping[str, str], name: str, attrs: Mapping[str, Any]
    ) -> RequestTrace:
        """The request's trace, continuing the caller's `traceparent` when it is valid. `attrs`
        is kept as it is (not copied), for the server span's starting attributes.

        The trace flags sent upstream are the ones the server span would have had: sampled
        unless a head sampler (`OTEL_TRACES_SAMPLER`) says otherwise, and the caller's
        random-trace-id flag (set for a trace id of our own)."""
        parent = _ROOT
        trace_id = 0
        flags = TraceFlags.RANDOM_TRACE_ID
        tracestate = ""
        if headers.get("traceparent"):
            extracted = self.propagator.extract(carrier=headers)
            caller = trace.get_current_span(extracted).get_span_context()
            if caller.is_valid:
                parent = extracted
                trace_id = caller.trace_id
                flags = caller.trace_flags & TraceFlags.RANDOM_TRACE_ID
                if caller.trace_state:
                    tracestate = caller.trace_state.to_header()
        if not trace_id:
            trace_id = _random_id(128)
        sampled = True
        if self.head is not None:
            # Asked once, now: the flag sent upstream has to be known before the outcome is, and
            # an unsampled request records nothing. Every sampler OTEL_TRACES_SAMPLER can name
            # decides on the parent and the trace id alone, so the provider gives the spans made
            # at the end the same answer.
            result = self.head.should_sample(parent, trace_id, name, SpanKind.SERVER)
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
        if sampled:
            flags |= TraceFlags.SAMPLED
        return RequestTrace(
            self, parent, trace_id, flags, tracestate, name, attrs, self.exporting and sampled
        )

    async def shutdown(self, timeout: float) -> bool:
        """Flush and shut down within `timeout` seconds; True when it finished in time."""
        done = threading.Event()
        millis = max(1, int(timeout * 1000))

        def run() -> None:
            try:
                self.provider.force_flush(millis)
                self.provider.shutdown()
            finally:
                done.set()

        # A daemon thread: if the collector is down and the exporter is still retrying when the
        # time is up, the process may exit without waiting for it.
        threading.Thread(target=run, name="sidecar-trace-flush", daemon=True).start()
        return await asyncio.to_thread(done.wait, max(timeout, 0.0))


@dataclass(eq=False, slots=True)
class AttemptSpan:
    """One upstream attempt's client span, as a record (ended once, by whoever learns its
    outcome). `attrs` is the attempt's own dict; like a real span, it ignores attributes set
    after its end."""

    number: int
    upstream: str
    started: float
    name: str
    attrs: dict[str, Any]
    span_id: int
    start_ns: int
    end_ns: int = 0
    events: list[EventRecord] = field(default_factory=list)
    error: str | None = None
    status: int | None = None
    mode: FailureMode | None = None
    interrupted: bool = False
    ended: bool = False

    def set_attribute(self, key: str, value: Any) -> None:
        if not self.ended:
            self.attrs.pop(key, None)  # a key set again moves to the end, as in the SDK
            self.attrs[key] = value


class RequestTrace:
    """The spans of one proxied request, as records: the server span and its attempt spans.
    `trace_id` and `span_id` (the server span's) are hex, as in headers and logs."""

    __slots__ = (
        "_attrs",
        "_end_ns",
        "_events",
        "_finished",
        "_flags",
        "_name",
        "_parent",
        "_recording",
        "_span_id",
        "_start_ns",
        "_trace_id",
        "_tracestate",
        "attempts",
        "span_id",
        "trace_id",
        "tracing",
    )

    def __init__(
        self,
        tracing: Tracing,
        parent: Context,
        trace_id: int,
        flags: int,
        tracestate: str,
        name: str,
        attrs: Mapping[str, Any],
        recording: bool,
    ) -> None:
        self.tracing = tracing
        self._parent = parent
        self._trace_id = trace_id
        self._span_id = _random_id(64)
        self._flags = flags
        self._tracestate = tracestate
        self._name = name
        self._attrs = attrs
        self._recording = recording
        self._events: list[EventRecord] = []
        self._start_ns = time.time_ns()
        self._end_ns = 0
        self._finished = False
        self.attempts: list[AttemptSpan] = []
        self.trace_id = f"{trace_id:032x}"
        self.span_id = f"{self._span_id:016x}"

    # -- attempts ------------------------------------------------------------------------------
    def start_attempt(
        self, number: int, upstream: str, started: float, attrs: dict[str, Any]
    ) -> AttemptSpan:
        """The attempt's span (`attrs` becomes its own, not copied), now the task's attempt."""
        attempt = AttemptSpan(
            number=number,
            upstream=upstream,
            started=started,
            name=f"{attrs.get('http.request.method', 'HTTP')} {upstream}",
            attrs=attrs,
            span_id=_random_id(64),
            start_ns=time.time_ns(),
        )
        self.attempts.append(attempt)
        _TASK_ATTEMPT.set(attempt)
        return attempt

    def inject(
        self, attempt: AttemptSpan, headers: Sequence[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """The request headers with the caller's trace context replaced by this attempt's."""
        out = [(k, v) for k, v in headers if k.lower() not in _HEADERS]
        out.append(("traceparent", f"00-{self.trace_id}-{attempt.span_id:016x}-{self._flags:02x}"))
        if self._tracestate:
            out.append(("tracestate", self._tracestate))
        return out

    def open_attempt(self) -> AttemptSpan | None:
        """The attempt this task started, if it has not ended; else the most recent one that has
        not ended."""
        mine = _TASK_ATTEMPT.get()
        # `in` compares by identity here: a task keeps its pointer from an earlier request.
        if mine is not None and not mine.ended and mine in self.attempts:
            return mine
        for attempt in reversed(self.attempts):
            if not attempt.ended:
                return attempt
        return None

    def end_attempt(self, attempt: AttemptSpan, mode: FailureMode | None = None) -> None:
        if attempt.ended:
            return
        if mode is not None and attempt.mode is None:
            attempt.mode = mode
        if attempt.mode is not None:
            value = attempt.mode.value
            attempt.set_attribute("sidecar.failure_mode", value)
            attempt.set_attribute("error.type", value)
            attempt.error = value
        attempt.ended = True
        attempt.end_ns = time.time_ns()

    # -- events --------------------------------------------------------------------------------
    def add_event(self, name: str, attrs: Mapping[str, Any], *, on_attempt: bool = False) -> None:
        """Note an event (`attrs` kept as it is) on the server span, or on the task's open
        attempt."""
        if not self._recording or self._finished:
            return
        events = self._events
        if on_attempt:
            attempt = self.open_attempt()
            if attempt is not None:
                events = attempt.events
        events.append((name, attrs, time.time_ns()))

    # -- the end -------------------------------------------------------------------------------
    def finish(self, attrs: Mapping[str, Any], name: str | None, error: str | None) -> None:
        """End every open attempt, then the server span; the tail decision says whether the
        trace becomes real spans."""
        if self._finished:
            return
        for attempt in self.attempts:
            self.end_attempt(attempt)
        self._finished = True
        self._end_ns = time.time_ns()
        processor = self.tracing.processor
        if not self._recording or processor is None:
            return
        plain = is_plain_success(
            self._final(attrs, "sidecar.failure_mode"),
            self._final(attrs, "sidecar.outcome"),
            error is not None,
        )
        if processor.decide(self._trace_id, plain):
            self._materialize(attrs, name or self._name, error)

    def _final(self, attrs: Mapping[str, Any], key: str) -> Any:
        """The server span's value for `key` at the end: the last one set that was not None."""
        value = attrs.get(key)
        return self._attrs.get(key) if value is None else value

    def _materialize(self, attrs: Mapping[str, Any], name: str, error: str | None) -> None:
        """Create, fill and end the real spans, with the times and ids noted as it ran."""
        tracing = self.tracing
        start_span = tracing.tracer.start_span
        ids = tracing.ids
        server_attrs = clean_attrs(self._attrs)
        for key, value in clean_attrs(attrs).items():
            server_attrs.pop(key, None)  # set again at the end: last, as in the SDK
            server_attrs[key] = value
        ids.trace_id, ids.span_id = self._trace_id, self._span_id
        try:
            server = start_span(
                name,
                context=self._parent,
                kind=SpanKind.SERVER,
                attributes=server_attrs,
                start_time=self._start_ns,
            )
        finally:
            ids.trace_id = ids.span_id = 0
        for event_name, event_attrs, at in self._events:
            server.add_event(event_name, clean_attrs(event_attrs), at)
        if error is not None:
            server.set_status(Status(StatusCode.ERROR, error))
        context = trace.set_span_in_context(server)
        for attempt in self.attempts:
            ids.span_id = attempt.span_id
            try:
                span = start_span(
                    attempt.name,
                    context=context,
                    kind=SpanKind.CLIENT,
                    attributes=clean_attrs(attempt.attrs),
                    start_time=attempt.start_ns,
                )
            finally:
                ids.span_id = 0
            for event_name, event_attrs, at in attempt.events:
                span.add_event(event_name, clean_attrs(event_attrs), at)
            if attempt.error is not None:
                span.set_status(Status(StatusCode.ERROR, attempt.error))
            span.end(attempt.end_ns)
        server.end(self._end_ns)
