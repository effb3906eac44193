"""Per-request state that every layer of the pipeline reads and writes.

Core module (stdlib only). One `RequestContext` lives for one proxied request; strategies record
attempts, failures and events on it, and the server turns it into headers, logs and telemetry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sidecar.clock import Clock
from sidecar.errors import FailureMode
from sidecar.outcome import Outcome

__all__ = ["EventSink", "RequestContext", "ResilienceEvent"]


@dataclass(frozen=True)
class ResilienceEvent:
    """A strategy event with a fixed name (`retry`, `budget_refused`, `circuit_opened`, ...)."""

    name: str
    time: float
    attrs: dict[str, Any]


EventSink = Callable[[ResilienceEvent, "RequestContext | None"], None]


def _no_sink(event: ResilienceEvent, ctx: RequestContext | None) -> None:
    return None


@dataclass
class RequestContext:
    request_id: str
    route: str
    upstream: str
    clock: Clock
    started: float
    method: str = "GET"
    path: str = "/"
    deadline: float | None = None
    trace_id: str = ""
    span_id: str = ""
    attempts: int = 0
    retries: int = 0
    failure_mode: FailureMode | None = None
    outcome: Outcome | None = None
    fallback_kind: str | None = None
    budget_refused: bool = False
    breaker_state: str | None = None
    confidence: float | None = None
    #: "auto" | "review" | "reject" once the confidence gate judged the answer ("missing" when
    #: the answer carried no usable confidence); None otherwise.
    confidence_band: str | None = None
    review_id: str | None = None
    upstream_status: int | None = None
    upstream_seconds: float = 0.0
    first_byte_seconds: float | None = None
    response_started: bool = False
    stream_chunks: int = 0
    stream_max_gap: float = 0.0
    events: list[ResilienceEvent] = field(default_factory=list)
    sink: EventSink = _no_sink
    extra: dict[str, Any] = field(default_factory=dict)
    #: Run once by the server when the request is over (last byte written, or failed): a
    #: bulkhead frees its slot, the last-known-good cache stores a fully streamed answer.
    finish_hooks: list[Callable[[RequestContext], None]] = field(default_factory=list)

    def remaining(self) -> float | None:
        """Seconds left before the deadline, or None when there is no deadline."""
        if self.deadline is None:
            return None
        return self.deadline - self.clock.monotonic()

    def emit(self, name: str, **attrs: Any) -> None:
        event = ResilienceEvent(name=name, time=self.clock.monotonic(), attrs=attrs)
        self.events.append(event)
        self.sink(event, self)

    def elapsed(self) -> float:
        return self.clock.monotonic() - self.started

    def finish(self) -> None:
        """Run the finish hooks once, in order; one failing hook does not stop the others."""
        hooks, self.finish_hooks = self.finish_hooks, []
        for hook in hooks:
            try:
                hook(self)
            except Exception as exc:  # a hook must never break the access log or the answer
                self.emit("finish_hook_failed", error=f"{type(exc).__name__}: {exc}")
