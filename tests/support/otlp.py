"""A real OTLP/HTTP trace receiver on loopback: what a collector (or Jaeger v2) would get.

It accepts `POST /v1/traces` with protobuf bodies (optionally gzip), decodes them with
`opentelemetry-proto` and keeps every span as a plain `ReceivedSpan`, so tests assert on exactly
what the sidecar exported: ids, parent links, names, kinds, attributes, events and status.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

__all__ = ["OtlpReceiver", "ReceivedSpan"]

KIND = {
    Span.SPAN_KIND_INTERNAL: "internal",
    Span.SPAN_KIND_SERVER: "server",
    Span.SPAN_KIND_CLIENT: "client",
    Span.SPAN_KIND_PRODUCER: "producer",
    Span.SPAN_KIND_CONSUMER: "consumer",
}
STATUS = {
    Status.STATUS_CODE_UNSET: "unset",
    Status.STATUS_CODE_OK: "ok",
    Status.STATUS_CODE_ERROR: "error",
}


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attrs(value.kvlist_value.values)
    return getattr(value, which)


def _attrs(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kv: KeyValue
    for kv in items:
        out[kv.key] = _value(kv.value)
    return out


@dataclass
class ReceivedEvent:
    name: str
    attributes: dict[str, Any]


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    attributes: dict[str, Any]
    events: list[ReceivedEvent]
    status: str
    status_message: str
    resource: dict[str, Any]
    start_ns: int
    end_ns: int

    def event(self, name: str) -> ReceivedEvent | None:
        for event in self.events:
            if event.name == name:
                return event
        return None

    def event_names(self) -> list[str]:
        return [e.name for e in self.events]


@dataclass
class OtlpReceiver:
    host: str = "127.0.0.1"
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None
    _changed: asyncio.Condition | None = None

    @property
    def endpoint(self) -> str:
        """The value for `OTEL_EXPORTER_OTLP_ENDPOINT` (the SDK appends `/v1/traces`)."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> OtlpReceiver:
        self._changed = asyncio.Condition()
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        received = []
        for resource_spans in message.resource_spans:
            resource = _attrs(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=KIND.get(span.kind, str(span.kind)),
                            attributes=_attrs(span.attributes),
                            events=[
                                ReceivedEvent(e.name, _attrs(e.attributes)) for e in span.events
                            ],
                            status=STATUS.get(span.status.code, str(span.status.code)),
                            status_message=span.status.message,
                            resource=resource,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        assert self._changed is not None
        async with self._changed:
            self.requests += 1
            self.spans.extend(received)
            self._changed.notify_all()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    # -- queries -------------------------------------------------------------------------------
    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def servers(self) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.kind == "server"]

    async def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        """Wait (bounded) until `predicate(all spans so far)` holds; return the spans."""
        assert self._changed is not None
        deadline = time.monotonic() + timeout
        async with self._changed:
            while not predicate(self.spans):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = [(s.name, s.trace_id[:8]) for s in self.spans]
                    raise TimeoutError(f"spans not received in time; have {names}")
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    continue
        return list(self.spans)

    async def wait_trace(
        self, trace_id: str, spans: int = 1, timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        """The spans of `trace_id` once its server span (and at least `spans` spans) arrived."""

        def done(all_spans: list[ReceivedSpan]) -> bool:
            mine = [s for s in all_spans if s.trace_id == trace_id]
            return len(mine) >= spans and any(s.kind == "server" for s in mine)

        await self.wait_for(done, timeout)
        return self.trace(trace_id)
