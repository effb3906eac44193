"""Failure-biased trace sampling: record everything, decide when the request ends.

The rule: a request's whole trace is exported if the request was not a plain success (it failed,
was retried, fell back, was escalated or rejected, or the caller went away: any
`sidecar.failure_mode`, a `sidecar.outcome` other than `ok`, or status ERROR), and otherwise only
when the trace id is among the configured share of successes. That choice is deterministic: the
same rule as OpenTelemetry's `TraceIdRatioBased` sampler (the low 64 bits of the trace id below
`ratio * 2**64`), so a test that sends chosen `traceparent` ids knows exactly which successes are
exported, and every hop that uses the same rule keeps the same traces.

A `FailureBiasedProcessor` sits between the tracer provider and the batch exporter and holds the
decisions. The proxy's traces are deferred (`sidecar.telemetry.tracing`): `RequestTrace.finish`
asks `decide` before any SDK span exists, and only a trace that is kept is then made into spans,
which pass straight through. Spans made any other way are buffered per trace, and the end of a
trace's server span (the one with `sidecar.request_id`) decides it the same way.

The ratio comes from `SIDECAR_TRACE_SUCCESS_RATIO`, else the policy's `tracing.success_ratio`
(re-read at every decision, so a policy reload changes it), else 0.1.

Interaction with `OTEL_TRACES_SAMPLER`: that variable configures the *head* sampler, which decides
when a request begins, before anyone knows how it will end. By default the sidecar records every
request (`always_on`, ignoring the caller's sampled flag) so that this tail decision sees every
failure. If you set `OTEL_TRACES_SAMPLER` (e.g. `parentbased_traceidratio`), it is asked once, when
the request begins, for its server span: its answer is the sampled flag of the `traceparent` sent
to the model server (which must go out before the outcome is known), and a request it does not
sample is never recorded, so its failures are not exported either; the success ratio here applies
to what is left. The spans of a kept trace are then made by the provider, which asks the sampler
again with the same parent and trace id: every sampler `OTEL_TRACES_SAMPLER` can name decides on
those alone, so it gives the same answer. Leave it unset unless you want that.

Memory is bounded: at most `max_traces` traces are buffered (the oldest is dropped, counted as
`evicted`, when more are open at once) and `max_spans` spans per trace; deferred traces are never
buffered. Spans that end after their trace was decided follow the decision, which is remembered
for the most recent traces.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanKind, StatusCode

__all__ = [
    "DEFAULT_SUCCESS_RATIO",
    "FailureBiasedProcessor",
    "env_success_ratio",
    "is_plain_success",
    "success_selected",
]

DEFAULT_SUCCESS_RATIO = 0.1
ENV_RATIO = "SIDECAR_TRACE_SUCCESS_RATIO"
_TRACE_ID_LIMIT = (1 << 64) - 1
#: Marks the span whose end decides its trace (the proxy's server span).
ROOT_MARKER = "sidecar.request_id"

Decision = Callable[[str], None]


def env_success_ratio(env: Mapping[str, str] | None = None) -> float | None:
    """The ratio from `SIDECAR_TRACE_SUCCESS_RATIO`, or None when unset; a bad value raises."""
    raw = (env if env is not None else os.environ).get(ENV_RATIO, "").strip()
    if not raw:
        return None
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{ENV_RATIO} must be between 0 and 1, got {raw!r}")
    return value


def success_selected(trace_id: int, ratio: float) -> bool:
    """Is this trace among the `ratio` share of successes exported? (TraceIdRatioBased's rule.)"""
    if ratio >= 1.0:
        return True
    if ratio <= 0.0:
        return False
    bound = round(ratio * (_TRACE_ID_LIMIT + 1))
    return trace_id & _TRACE_ID_LIMIT < bound


def is_plain_success(failure_mode: object, outcome: object, error: bool) -> bool:
    """A request whose trace is exported only by ratio: no failure mode, an `ok` outcome (or
    none), no ERROR status. Takes the server span's final values."""
    return not error and not failure_mode and outcome in (None, "ok")


def _is_plain_success(span: ReadableSpan) -> bool:
    attrs = span.attributes or {}
    return is_plain_success(
        attrs.get("sidecar.failure_mode"),
        attrs.get("sidecar.outcome"),
        span.status.status_code == StatusCode.ERROR,
    )


class FailureBiasedProcessor(SpanProcessor):
    def __init__(
        self,
        delegate: SpanProcessor,
        ratio: Callable[[], float],
        *,
        on_decision: Decision | None = None,
        max_traces: int = 4096,
        max_spans: int = 512,
        remember: int = 4096,
    ) -> None:
        self._delegate = delegate
        self._ratio = ratio
        self._on_decision = on_decision or (lambda decision: None)
        self._max_traces = max_traces
        self._max_spans = max_spans
        self._remember = remember
        self._buffers: OrderedDict[int, list[ReadableSpan]] = OrderedDict()
        self._decided: OrderedDict[int, bool] = OrderedDict()
        self._lock = threading.Lock()

    def decide(self, trace_id: int, plain: bool) -> bool:
        """Decide a trace now (a deferred one, before its spans exist): True to export it. Its
        spans that end from now on follow the decision; any already buffered go with it."""
        with self._lock:
            keep, decision, export = self._settle(trace_id, plain)
        self._on_decision(decision)
        for item in export:
            self._delegate.on_end(item)
        return keep

    def _settle(self, trace_id: int, plain: bool) -> tuple[bool, str, list[ReadableSpan]]:
        """With the lock held: decide, remember, and take the trace's buffered spans."""
        spans = self._buffers.pop(trace_id, [])
        keep = not plain or success_selected(trace_id, self._ratio())
        self._decided[trace_id] = keep
        while len(self._decided) > self._remember:
            self._decided.popitem(last=False)
        if not keep:
            return False, "dropped", []
        return True, "exported_success" if plain else "exported_failure", spans

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._delegate.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        trace_id = context.trace_id
        export: list[ReadableSpan] = []
        decision = None
        evicted = 0
        with self._lock:
            decided = self._decided.get(trace_id)
            if decided is not None:
                if decided:
                    export.append(span)
            elif span.kind == SpanKind.SERVER and ROOT_MARKER in (span.attributes or {}):
                keep, decision, export = self._settle(trace_id, _is_plain_success(span))
                if keep:
                    export.append(span)
            else:
                buffered = self._buffers.get(trace_id)
                if buffered is None:
                    buffered = self._buffers[trace_id] = []
                    while len(self._buffers) > self._max_traces:
                        self._buffers.popitem(last=False)
                        evicted += 1
                if len(buffered) < self._max_spans:
                    buffered.append(span)
        if decision is not None:
            self._on_decision(decision)
        for _ in range(evicted):
            self._on_decision("evicted")
        for item in export:
            self._delegate.on_end(item)

    def shutdown(self) -> None:
        with self._lock:
            self._buffers.clear()
        self._delegate.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._delegate.force_flush(timeout_millis)
