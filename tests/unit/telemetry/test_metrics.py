"""Metrics: request accounting, route and breaker recovery, the review backlog, exposition."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sidecar.clock import FakeClock
from sidecar.context import RequestContext
from sidecar.errors import FailureMode
from sidecar.outcome import Outcome
from sidecar.strategies.breaker import BreakerConfig, CircuitBreaker
from sidecar.telemetry.metrics import Metrics, request_failed


def value(metrics: Metrics, name: str, **labels: str) -> float:
    for sample_name, sample_labels, sample_value in metrics.samples():
        if sample_name == name and sample_labels == labels:
            return sample_value
    return 0.0


def ctx(clock: FakeClock, route: str = "fraud", mode: FailureMode | None = None) -> RequestContext:
    c = RequestContext(
        request_id="r", route=route, upstream="model", clock=clock, started=clock.monotonic()
    )
    c.failure_mode = mode
    return c


def test_requests_failures_and_the_unmatched_route() -> None:
    clock = FakeClock()
    m = Metrics()
    m.observe_request(ctx(clock), Outcome.OK, 0.1, 0.05)
    m.observe_request(ctx(clock, mode=FailureMode.ATTEMPT_TIMEOUT), Outcome.ERROR, 1.0, None)
    m.observe_request(ctx(clock, route="", mode=FailureMode.CLIENT_ERROR), Outcome.ERROR, 0, None)
    assert value(m, "sidecar_requests_total", route="fraud", outcome="ok") == 1
    assert value(m, "sidecar_failures_total", route="fraud", mode="attempt_timeout") == 1
    assert value(m, "sidecar_failures_total", route="(none)", mode="client_error") == 1
    assert value(m, "sidecar_time_to_first_byte_seconds_count", route="fraud") == 1
    assert value(m, "sidecar_request_duration_seconds_sum", route="fraud", outcome="error") == 1.0


def test_route_recovery_is_first_failure_to_first_success() -> None:
    clock = FakeClock()
    m = Metrics()
    m.observe_request(ctx(clock, mode=FailureMode.UPSTREAM_5XX), Outcome.ERROR, 0, None)
    clock.advance(3)
    m.observe_request(ctx(clock, mode=FailureMode.CIRCUIT_OPEN), Outcome.ERROR, 0, None)
    # A caller's own mistake neither starts nor ends an outage.
    m.observe_request(ctx(clock, mode=FailureMode.CLIENT_ERROR), Outcome.ERROR, 0, None)
    clock.advance(4)
    m.observe_request(ctx(clock), Outcome.RETRIED, 0, None)
    m.observe_request(ctx(clock), Outcome.OK, 0, None)
    assert value(m, "sidecar_route_recovery_seconds_count", route="fraud") == 1
    assert value(m, "sidecar_route_recovery_seconds_sum", route="fraud") == 7
    assert not request_failed(FailureMode.LOW_CONFIDENCE)
    assert request_failed(FailureMode.OVERLOADED)


def test_breaker_state_transitions_and_recovery() -> None:
    clock = FakeClock()
    m = Metrics()
    breaker = CircuitBreaker("model", BreakerConfig(consecutive_failures=1, jitter=0), clock)
    breaker.listeners.append(m.breaker_transition)
    m.watch(breakers=lambda: [breaker], in_flight=lambda: 3, wall=clock.wall)
    breaker.record_failure(breaker.admit())
    assert value(m, "sidecar_breaker_state", upstream="model") == 2
    clock.advance(10)
    probe = breaker.admit()
    assert probe.probe
    assert value(m, "sidecar_breaker_state", upstream="model") == 1
    breaker.record_success(probe)
    assert value(m, "sidecar_breaker_state", upstream="model") == 0
    for to in ("open", "half_open", "closed"):
        assert value(m, "sidecar_breaker_transitions_total", upstream="model", to=to) == 1
    assert value(m, "sidecar_breaker_recovery_seconds_sum", upstream="model") == 10
    assert value(m, "sidecar_requests_in_flight") == 3


def test_review_backlog_age_is_computed_at_scrape_time() -> None:
    clock = FakeClock()
    m = Metrics()
    m.watch(breakers=list, in_flight=lambda: 0, wall=clock.wall)
    m.set_review_backlog(2, clock.wall() - 30)
    clock.advance(15)
    assert value(m, "sidecar_reviews_pending") == 2
    assert value(m, "sidecar_review_oldest_pending_seconds") == 45
    m.review_resolved(120, "approve")
    assert value(m, "sidecar_review_resolution_seconds_count", decision="approve") == 1
    m.set_review_backlog(0, None)
    assert value(m, "sidecar_review_oldest_pending_seconds") == 0


def test_registries_are_per_instance_and_render_negotiates() -> None:
    a, b = Metrics(), Metrics()
    a.observe_event("retry", "fraud", {"reason": "connect_error"})
    assert value(a, "sidecar_retries_total", route="fraud", reason="connect_error") == 1
    assert value(b, "sidecar_retries_total", route="fraud", reason="connect_error") == 0
    body, content_type = a.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"sidecar_retries", "sidecar_breaker_state", "sidecar_event_loop_lag_seconds"} <= names
    body, content_type = a.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_user_reported_failures_count_with_the_others() -> None:
    m = Metrics()
    m.failure_reported("fraud")
    assert value(m, "sidecar_failures_total", route="fraud", mode="user_reported") == 1
