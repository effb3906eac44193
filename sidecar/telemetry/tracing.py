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
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar.errors import FailureMode
from sidecar.telemetry.sampling import FailureBiasedProcessor

__all__ = ["AttemptSpan", "RequestTrace", "Tracing", "build_exporter"]

SERVICE_NAME = "ai-resilience-sidecar"
_HEADERS = ("traceparent", "tracestate")

AttrValue = str | bool | int | float

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
        self.provider = TracerProvider(
            sampler=sampler, resource=_resource(), shutdown_on_exit=False
        )
        self.exporter = exporter if exporter is not None else build_exporter(env, warn)
        self.processor: SpanProcessor | None = None
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
        parent = self.propagator.extract(carrier=headers)
        span = self.tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=clean_attrs(attrs)
        )
        return RequestTrace(self, span)

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


@dataclass
class AttemptSpan:
    """One upstream attempt's client span (ended once, by whoever learns its outcome)."""

    span: Span
    number: int
    upstream: str
    started: float
    status: int | None = None
    mode: FailureMode | None = None
    interrupted: bool = False
    ended: bool = False


class RequestTrace:
    """The spans of one proxied request: the server span and its attempt spans."""

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self.tracing = tracing
        self.span = span
        self.context: Context = trace.set_span_in_context(span)
        self.attempts: list[AttemptSpan] = []
        context = span.get_span_context()
        if context.is_valid:
            self.trace_id = trace.format_trace_id(context.trace_id)
            self.span_id = trace.format_span_id(context.span_id)
        else:  # the SDK is disabled: ids for headers and logs all the same
            self.trace_id = secrets.token_hex(16)
            self.span_id = secrets.token_hex(8)

    # -- attempts ------------------------------------------------------------------------------
    def start_attempt(
        self, number: int, upstream: str, started: float, attrs: Mapping[str, Any]
    ) -> AttemptSpan:
        span = self.tracing.tracer.start_span(
            f"{attrs.get('http.request.method', 'HTTP')} {upstream}",
            context=self.context,
            kind=SpanKind.CLIENT,
            attributes=clean_attrs(attrs),
        )
        attempt = AttemptSpan(span=span, number=number, upstream=upstream, started=started)
        self.attempts.append(attempt)
        _TASK_ATTEMPT.set(attempt)
        return attempt

    def inject(
        self, attempt: AttemptSpan, headers: Sequence[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """The request headers with the caller's trace context replaced by this attempt's."""
        carrier: dict[str, str] = {}
        self.tracing.propagator.inject(carrier, context=trace.set_span_in_context(attempt.span))
        out = [(k, v) for k, v in headers if k.lower() not in _HEADERS]
        out.extend(carrier.items())
        return out

    def open_attempt(self) -> AttemptSpan | None:
        """The attempt this task started, if it has not ended; else the most recent one that has
        not ended."""
        mine = _TASK_ATTEMPT.get()
        if mine is not None and not mine.ended and any(a is mine for a in self.attempts):
            return mine
        for attempt in reversed(self.attempts):
            if not attempt.ended:
                return attempt
        return None

    def end_attempt(self, attempt: AttemptSpan, mode: FailureMode | None = None) -> None:
        if attempt.ended:
            return
        attempt.ended = True
        if mode is not None and attempt.mode is None:
            attempt.mode = mode
        span = attempt.span
        if attempt.mode is not None:
            span.set_attribute("sidecar.failure_mode", attempt.mode.value)
            span.set_attribute("error.type", attempt.mode.value)
            span.set_status(Status(StatusCode.ERROR, attempt.mode.value))
        span.end()

    # -- events --------------------------------------------------------------------------------
    def add_event(self, name: str, attrs: Mapping[str, Any], *, on_attempt: bool = False) -> None:
        target = self.span
        if on_attempt:
            attempt = self.open_attempt()
            if attempt is not None:
                target = attempt.span
        target.add_event(name, clean_attrs(attrs))

    # -- the end -------------------------------------------------------------------------------
    def finish(self, attrs: Mapping[str, Any], name: str | None, error: str | None) -> None:
        """End every open attempt, then the server span (which decides sampling)."""
        for attempt in self.attempts:
            self.end_attempt(attempt)
        if name:
            self.span.update_name(name)
        self.span.set_attributes(clean_attrs(attrs))
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()
