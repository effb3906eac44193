"""Prometheus metrics for one app: a `Metrics` object with its own `CollectorRegistry`.

Lives on `SidecarState.metrics` (no process-global registry, so several apps can run in one
process) and is rendered as Prometheus text at `/metrics` on the admin port. Request metrics are
recorded once per request when the server span ends (`sidecar.telemetry.events`); strategy
events, breaker transitions and the review queue feed the rest through the methods below.

Everything is named `sidecar_*`, counters end in `_total`, durations are seconds:

- `sidecar_requests_total{route,outcome}`, `sidecar_failures_total{route,mode}` (the failure mode
  the caller saw, once per request), `sidecar_request_duration_seconds{route,outcome}`,
  `sidecar_time_to_first_byte_seconds{route}` (request start to the first body byte sent),
  `sidecar_requests_in_flight`;
- `sidecar_upstream_attempts_total{upstream,result}` and
  `sidecar_upstream_attempt_duration_seconds{upstream,result}` (`result` is `ok` or the mode);
- `sidecar_retries_total{route,reason}`, `sidecar_retry_budget_refusals_total{route}`,
  `sidecar_shed_total{route}`, `sidecar_fallbacks_total{route,kind}`,
  `sidecar_escalations_total{route}`, `sidecar_events_total{route,event}` (every strategy event);
- `sidecar_breaker_state{upstream}` (0 closed, 1 half-open, 2 open),
  `sidecar_breaker_transitions_total{upstream,to}`, `sidecar_breaker_recovery_seconds{upstream}`
  (first open → closed), `sidecar_route_recovery_seconds{route}` (first failure → first success),
  `sidecar_breaker_sync_errors_total{operation}` (the shared breaker store was unreachable);
- `sidecar_reviews_pending`, `sidecar_review_oldest_pending_seconds`,
  `sidecar_review_resolution_seconds{decision}` (fed by the review queue);
- `sidecar_event_loop_lag_seconds`, `sidecar_traces_total{decision}` (failure-biased sampling:
  `exported_failure`, `exported_success`, `dropped`, `evicted`), `sidecar_alerts_total{rule,result}`
  (`sent`, `failed`, `suppressed`, `logged`, `dropped`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from sidecar.context import RequestContext
from sidecar.errors import FailureMode
from sidecar.outcome import Outcome
from sidecar.strategies.breaker import STATE_VALUE, CircuitBreaker, State

__all__ = ["NO_ROUTE", "Metrics", "request_failed", "transition_label"]

#: The `route` label of requests that matched no route (a route name can never contain "(").
NO_ROUTE = "(none)"

#: Failures of the caller's own making, and quality verdicts, are not availability failures.
_NOT_FAILURES = frozenset(
    {
        FailureMode.CLIENT_ERROR,
        FailureMode.CLIENT_CANCELLED,
        FailureMode.LOW_CONFIDENCE,
        FailureMode.USER_REPORTED,
    }
)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_RECOVERY = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
_REVIEW = (10, 30, 60, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400)
_LAG = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def request_failed(mode: FailureMode | None) -> bool:
    """True when a request's failure mode says the model or the sidecar failed it (not the
    caller, not a confidence verdict). Used for failure ratios and route recovery."""
    return mode is not None and mode not in _NOT_FAILURES


def transition_label(state: str) -> str:
    """Breaker state as a label value (`half-open` → `half_open`)."""
    return state.replace("-", "_")


def _route(route: str) -> str:
    return route or NO_ROUTE


class _LiveCollector(Collector):
    """Gauges read at scrape time: breaker states, in-flight requests, the review backlog."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        state = GaugeMetricFamily(
            "sidecar_breaker_state",
            "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open.",
            labels=["upstream"],
        )
        for breaker in m.breakers():
            state.add_metric([breaker.name], STATE_VALUE.get(breaker.state, 0))
        yield state
        yield GaugeMetricFamily(
            "sidecar_requests_in_flight",
            "Requests the proxy is handling now.",
            value=m.in_flight(),
        )
        pending, oldest = m.review_backlog()
        yield GaugeMetricFamily(
            "sidecar_reviews_pending", "Requests waiting for human review.", value=pending
        )
        age = max(0.0, m.wall() - oldest) if pending and oldest is not None else 0.0
        yield GaugeMetricFamily(
            "sidecar_review_oldest_pending_seconds",
            "Age of the oldest pending review (0 when none is pending).",
            value=age,
        )

    def describe(self) -> Iterable[Metric]:
        return []


class Metrics:
    """The sidecar's Prometheus metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sidecar_requests", "Requests by route and outcome.", ["route", "outcome"], registry=r
        )
        self.failures = Counter(
            "sidecar_failures",
            "Requests that failed, by route and the failure mode the caller saw.",
            ["route", "mode"],
            registry=r,
        )
        self.request_duration = Histogram(
            "sidecar_request_duration_seconds",
            "Time from request arrival to the last byte of the answer.",
            ["route", "outcome"],
            buckets=_LATENCY,
            registry=r,
        )
        self.first_byte = Histogram(
            "sidecar_time_to_first_byte_seconds",
            "Time from request arrival to the first body byte sent to the caller "
            "(the first token of a stream).",
            ["route"],
            buckets=_LATENCY,
            registry=r,
        )
        self.attempts = Counter(
            "sidecar_upstream_attempts",
            "Upstream attempts by result (ok or the attempt's failure mode).",
            ["upstream", "result"],
            registry=r,
        )
        self.attempt_duration = Histogram(
            "sidecar_upstream_attempt_duration_seconds",
            "Duration of one upstream attempt, until its answer ended or it failed.",
            ["upstream", "result"],
            buckets=_LATENCY,
            registry=r,
        )
        self.retries = Counter(
            "sidecar_retries",
            "Retries by route and the mode retried.",
            ["route", "reason"],
            registry=r,
        )
        self.budget_refusals = Counter(
            "sidecar_retry_budget_refusals",
            "Retries the retry budget refused.",
            ["route"],
            registry=r,
        )
        self.shed = Counter(
            "sidecar_shed", "Requests shed by the concurrency limit.", ["route"], registry=r
        )
        self.fallbacks = Counter(
            "sidecar_fallbacks",
            "Answers served by a fallback, by kind (upstream, cache, rules, static).",
            ["route", "kind"],
            registry=r,
        )
        self.escalations = Counter(
            "sidecar_escalations", "Answers escalated to human review.", ["route"], registry=r
        )
        self.events = Counter(
            "sidecar_events", "Strategy events by name.", ["route", "event"], registry=r
        )
        self.breaker_transitions = Counter(
            "sidecar_breaker_transitions",
            "Circuit breaker transitions by the state entered.",
            ["upstream", "to"],
            registry=r,
        )
        self.breaker_sync_errors = Counter(
            "sidecar_breaker_sync_errors",
            "Failed exchanges with the shared breaker store (Redis) by operation; the breakers "
            "keep working locally meanwhile.",
            ["operation"],
            registry=r,
        )
        self.breaker_recovery = Histogram(
            "sidecar_breaker_recovery_seconds",
            "Time from a circuit first opening to it closing again.",
            ["upstream"],
            buckets=_RECOVERY,
            registry=r,
        )
        self.route_recovery = Histogram(
            "sidecar_route_recovery_seconds",
            "Time from a route's first failed request to its next successful one.",
            ["route"],
            buckets=_RECOVERY,
            registry=r,
        )
        self.review_resolution = Histogram(
            "sidecar_review_resolution_seconds",
            "Time from a review being queued to a reviewer's decision.",
            ["decision"],
            buckets=_REVIEW,
            registry=r,
        )
        self.loop_lag = Histogram(
            "sidecar_event_loop_lag_seconds",
            "How late the event loop ran a timer (time it was blocked).",
            buckets=_LAG,
            registry=r,
        )
        self.traces = Counter(
            "sidecar_traces",
            "Traces by sampling decision (exported_failure, exported_success, dropped, evicted).",
            ["decision"],
            registry=r,
        )
        self.alerts = Counter(
            "sidecar_alerts",
            "Alerts by rule and result (sent, failed, suppressed, logged, dropped).",
            ["rule", "result"],
            registry=r,
        )
        self._breakers: Callable[[], Iterable[CircuitBreaker]] = list
        self._in_flight: Callable[[], int] = lambda: 0
        self.wall: Callable[[], float] = time.time
        self._review_pending = 0
        self._review_oldest: float | None = None
        self._failing_since: dict[str, float] = {}
        r.register(_LiveCollector(self))

    # -- wiring --------------------------------------------------------------------------------
    def watch(
        self,
        *,
        breakers: Callable[[], Iterable[CircuitBreaker]],
        in_flight: Callable[[], int],
        wall: Callable[[], float] | None = None,
    ) -> None:
        """Tell the scrape-time gauges where to read breakers and the in-flight count."""
        self._breakers = breakers
        self._in_flight = in_flight
        if wall is not None:
            self.wall = wall

    def breakers(self) -> list[CircuitBreaker]:
        return list(self._breakers())

    def in_flight(self) -> int:
        return self._in_flight()

    # -- exposition ----------------------------------------------------------------------------
    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition the scraper's `Accept` header asks for (OpenMetrics or Prometheus
        text), and its content type; classic Prometheus text (0.0.4) by default."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    # -- requests and attempts -----------------------------------------------------------------
    def observe_request(
        self,
        ctx: RequestContext,
        outcome: Outcome,
        duration: float,
        first_byte: float | None,
    ) -> None:
        route = _route(ctx.route)
        self.requests.labels(route, outcome.value).inc()
        self.request_duration.labels(route, outcome.value).observe(duration)
        if first_byte is not None:
            self.first_byte.labels(route).observe(first_byte)
        mode = ctx.failure_mode
        if mode is not None:
            self.failures.labels(route, mode.value).inc()
        if ctx.fallback_kind and outcome == Outcome.FALLBACK:
            self.fallbacks.labels(route, ctx.fallback_kind).inc()
        if not ctx.route:
            return
        now = ctx.clock.monotonic()
        if request_failed(mode):
            self._failing_since.setdefault(ctx.route, now)
        elif mode is None and outcome in (Outcome.OK, Outcome.RETRIED):
            since = self._failing_since.pop(ctx.route, None)
            if since is not None:
                self.route_recovery.labels(ctx.route).observe(now - since)

    def failure_reported(self, route: str, mode: FailureMode = FailureMode.USER_REPORTED) -> None:
        """A failure learned after the request (the application's `user_reported` feedback)."""
        self.failures.labels(_route(route), mode.value).inc()

    def observe_attempt(self, upstream: str, result: str, seconds: float) -> None:
        self.attempts.labels(upstream, result).inc()
        self.attempt_duration.labels(upstream, result).observe(seconds)

    def observe_event(self, name: str, route: str, attrs: dict[str, Any]) -> None:
        route = _route(route)
        self.events.labels(route, name).inc()
        if name == "retry":
            self.retries.labels(route, str(attrs.get("reason") or "unknown")).inc()
        elif name == "budget_refused":
            self.budget_refusals.labels(route).inc()
        elif name == "shed":
            self.shed.labels(route).inc()
        elif name == "escalated":
            self.escalations.labels(route).inc()

    # -- breakers ------------------------------------------------------------------------------
    def breaker_transition(
        self, breaker: CircuitBreaker, old: str, new: str, ctx: RequestContext | None
    ) -> None:
        """A `CircuitBreaker` listener: count the transition; on closing, the recovery time."""
        self.breaker_transitions.labels(breaker.name, transition_label(new)).inc()
        if new == State.CLOSED and breaker.last_recovery_seconds is not None:
            self.breaker_recovery.labels(breaker.name).observe(breaker.last_recovery_seconds)

    def breaker_sync_error(self, operation: str) -> None:
        """The shared breaker store could not be reached (`sidecar.transport.breaker_sync`)."""
        self.breaker_sync_errors.labels(operation).inc()

    # -- the review queue (called by the review store) ------------------------------------------
    def set_review_backlog(self, pending: int, oldest_queued_at: float | None) -> None:
        """The number of pending reviews and the wall-clock time (epoch seconds) the oldest was
        queued; the age gauge is computed at scrape time."""
        self._review_pending = max(0, pending)
        self._review_oldest = oldest_queued_at if pending > 0 else None

    def review_backlog(self) -> tuple[int, float | None]:
        return self._review_pending, self._review_oldest

    def review_resolved(self, seconds: float, decision: str) -> None:
        """A reviewer decided a queued review `seconds` after it was queued."""
        self.review_resolution.labels(decision).observe(max(0.0, seconds))

    # -- the rest ------------------------------------------------------------------------------
    def observe_loop_lag(self, seconds: float) -> None:
        self.loop_lag.observe(max(0.0, seconds))

    def trace_decision(self, decision: str) -> None:
        self.traces.labels(decision).inc()

    def alert(self, rule: str, result: str) -> None:
        self.alerts.labels(rule, result).inc()

    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        """Every sample in the registry (for tests and `sidecar` diagnostics)."""
        for family in self.registry.collect():
            for sample in family.samples:
                yield sample.name, dict(sample.labels), sample.value
