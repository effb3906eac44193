"""Observability through the real sidecar and demo model: the spans a collector receives (a real
OTLP/HTTP receiver on loopback), trace context reaching the model, failure-biased sampling with
chosen trace ids, `/metrics` parsed with the Prometheus parser, alerts posted to a webhook, and a
dead collector or webhook changing nothing for callers."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SidecarFactory, SidecarProc
from tests.support.otlp import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
INFER = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [1.0]}]}
#: Metric families every sidecar exports from its first scrape.
FAMILIES = {
    "sidecar_requests": "counter",
    "sidecar_failures": "counter",
    "sidecar_retries": "counter",
    "sidecar_retry_budget_refusals": "counter",
    "sidecar_breaker_state": "gauge",
    "sidecar_breaker_transitions": "counter",
    "sidecar_breaker_recovery_seconds": "histogram",
    "sidecar_route_recovery_seconds": "histogram",
    "sidecar_escalations": "counter",
    "sidecar_reviews_pending": "gauge",
    "sidecar_review_oldest_pending_seconds": "gauge",
    "sidecar_review_resolution_seconds": "histogram",
    "sidecar_fallbacks": "counter",
    "sidecar_request_duration_seconds": "histogram",
    "sidecar_upstream_attempt_duration_seconds": "histogram",
    "sidecar_upstream_attempts": "counter",
    "sidecar_time_to_first_byte_seconds": "histogram",
    "sidecar_requests_in_flight": "gauge",
    "sidecar_shed": "counter",
    "sidecar_event_loop_lag_seconds": "histogram",
    "sidecar_events": "counter",
    "sidecar_traces": "counter",
    "sidecar_alerts": "counter",
}


def new_trace_id(low: int | None = None) -> str:
    """A random trace id; `low` fixes its low 64 bits (what the success ratio looks at)."""
    high = secrets.randbits(64) | 1
    low = secrets.randbits(64) if low is None else low
    return f"{high:016x}{low:016x}"


def traceparent(trace_id: str, flags: str = "01") -> str:
    return f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"


def traced_env(otlp: OtlpReceiver, ratio: str | None = "1", **extra: str) -> dict[str, str]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_SERVICE_NAME": "sidecar-under-test",
    }
    if ratio is not None:
        env["SIDECAR_TRACE_SUCCESS_RATIO"] = ratio
    env.update(extra)
    return env


@pytest.fixture
async def otlp() -> AsyncIterator[OtlpReceiver]:
    receiver = await OtlpReceiver().start()
    yield receiver
    await receiver.stop()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Scrape:
    samples: Samples
    types: dict[str, str]

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum over every sample of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)


async def scrape(http: aiohttp.ClientSession, sc: SidecarProc) -> Scrape:
    async with http.get(sc.admin_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, types)


def server_span(spans: list[ReceivedSpan]) -> ReceivedSpan:
    servers = [s for s in spans if s.kind == "server"]
    assert len(servers) == 1, [s.name for s in spans]
    return servers[0]


def attempt_spans(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return sorted(
        (s for s in spans if s.kind == "client"), key=lambda s: s.attributes["sidecar.attempt"]
    )


def all_events(spans: list[ReceivedSpan]) -> set[str]:
    return {e.name for s in spans for e in s.events}


async def demo_stats(http: aiohttp.ClientSession, model_url: str) -> dict[str, Any]:
    async with http.get(model_url + "/_demo/stats") as resp:
        data: dict[str, Any] = await resp.json()
        return data


# -- traces --------------------------------------------------------------------------------------


async def test_success_has_server_and_attempt_spans_and_context_reaches_the_model(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    otlp: OtlpReceiver,
) -> None:
    policy = {
        "upstreams": {"model": {"url": model_url}},
        "routes": [{"name": "chat", "match": {"path_prefix": "/v1"}, "upstream": "model"}],
    }
    sc = start_sidecar(policy, env=traced_env(otlp))
    trace_id = new_trace_id()
    caller = traceparent(trace_id)
    caller_span = caller.split("-")[2]
    headers = {"traceparent": caller, "tracestate": "vendor=abc", "authorization": "Bearer s3"}
    async with http.post(sc.url + "/v1/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["x-trace-id"] == trace_id
        assert resp.headers["x-sidecar-outcome"] == "ok"
        await resp.read()

    spans = await otlp.wait_trace(trace_id, spans=2)
    server = server_span(spans)
    (attempt,) = attempt_spans(spans)
    assert server.parent_span_id == caller_span
    assert attempt.parent_span_id == server.span_id
    assert server.name == "POST /v1"
    assert server.status == "unset"
    assert server.resource["service.name"] == "sidecar-under-test"
    a = server.attributes
    assert a["http.request.method"] == "POST"
    assert a["url.path"] == "/v1/chat/completions"
    assert a["url.scheme"] == "http"
    assert a["http.route"] == "/v1"
    assert a["http.response.status_code"] == 200
    assert a["network.protocol.version"] == "1.1"
    assert a["sidecar.route"] == "chat"
    assert a["sidecar.upstream"] == "model"
    assert a["sidecar.outcome"] == "ok"
    assert a["sidecar.attempt"] == 1
    assert a["sidecar.retry.count"] == 0
    assert a["sidecar.breaker.state"] == "closed"
    assert "sidecar.failure_mode" not in a and "error.type" not in a
    assert a["sidecar.time_to_first_byte_seconds"] > 0
    b = attempt.attributes
    assert b["sidecar.attempt"] == 1 and b["sidecar.upstream"] == "model"
    assert b["http.response.status_code"] == 200
    assert b["url.full"] == model_url + "/v1/chat/completions"
    assert attempt.status == "unset"
    # No secrets or bodies: the caller's authorization header is nowhere in the spans.
    assert "s3" not in repr([s.attributes for s in spans])

    # The model saw the attempt span as its parent, in the same trace, with the tracestate.
    seen = (await demo_stats(http, model_url))["last_headers"]
    version, tid, parent, flags = seen["traceparent"].split("-")
    assert (version, tid, parent) == ("00", trace_id, attempt.span_id)
    assert int(flags, 16) & 1
    assert seen["tracestate"] == "vendor=abc"

    # The access line carries the same ids.
    rec = sc.rp.wait_for_log(lambda r: r.get("event") == "request")
    assert rec["trace_id"] == trace_id and rec["span_id"] == server.span_id
    assert rec["ttfb_ms"] is not None


async def test_a_stream_is_summarised_on_the_span_not_an_event_per_chunk(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    otlp: OtlpReceiver,
) -> None:
    policy = {
        "upstreams": {"model": {"url": model_url}},
        "routes": [{"name": "chat", "match": {"path_prefix": "/v1"}, "upstream": "model"}],
    }
    sc = start_sidecar(policy, env=traced_env(otlp))
    # A pause of 300 ms after the first event (well under the idle limit) is the largest gap.
    headers = {"x-demo-fault": "stall_mid_stream=300ms"}
    async with http.post(
        sc.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    ) as resp:
        assert resp.status == 200
        trace_id = resp.headers["x-trace-id"]
        raw = await resp.read()
    assert b"[DONE]" in raw
    server = server_span(await otlp.wait_trace(trace_id, spans=2))
    assert server.attributes["sidecar.stream.chunks"] >= 2
    assert server.attributes["sidecar.stream.max_gap_seconds"] >= 0.3
    assert server.attributes["sidecar.outcome"] == "ok"
    assert server.attributes["sidecar.time_to_first_byte_seconds"] > 0
    assert server.events == []


@dataclass
class Case:
    route: str
    path: str
    mode: str
    status: int
    fault: str | None = None
    events: tuple[str, ...] = ()
    attempts: int = 1
    attempt_modes: tuple[str | None, ...] = ()
    body: Any = None
    outcome: str = "error"


def failure_policy(model_url: str) -> dict[str, Any]:
    off = {"enabled": False}

    def route(name: str, prefix: str, upstream: str = "model", **fields: Any) -> dict[str, Any]:
        return {"name": name, "match": {"path_prefix": prefix}, "upstream": upstream, **fields}

    one = {"max_attempts": 1}
    return {
        "upstreams": {
            "model": {"url": model_url, "breaker": off},
            "dead": {"url": "http://127.0.0.1:9", "breaker": off},
        },
        "routes": [
            route("connect", "/v2/models/connect", "dead", retry={"max_attempts": 2}),
            route("timeout", "/v2/models/timeout", timeouts={"total": "5s", "attempt": "200ms"}),
            route("deadline", "/v2/models/deadline", timeouts={"total": "300ms"}),
            route(
                "firstbyte",
                "/v2/models/firstbyte",
                retry=one,
                timeouts={"total": "5s", "first_byte": "200ms"},
            ),
            route(
                "stream",
                "/v1/chat/completions",
                timeouts={"total": "10s", "stream_idle": "200ms"},
            ),
            route("fivexx", "/v2/models/fivexx", retry=one),
            route("ratelimit", "/v2/models/ratelimit", retry=one),
            route("invalid", "/v2/models/invalid", retry=one, validate={}),
            route(
                "circuit",
                "/v2/models/circuit",
                retry=one,
                breaker={"consecutive_failures": 1, "open_for": "60s", "open_for_max": "60s"},
            ),
            route(
                "budget",
                "/v2/models/budget",
                retry={"max_attempts": 3},
                retry_budget={"ratio": 0, "min_per_second": 0},
            ),
            route("cancel", "/v2/models/cancel", timeouts={"total": "30s"}),
        ],
    }


CASES = [
    Case(
        "connect",
        "/v2/models/connect/infer",
        "connect_error",
        502,
        events=("retry",),
        attempts=2,
        attempt_modes=("connect_error", "connect_error"),
    ),
    Case(
        "timeout",
        "/v2/models/timeout/infer",
        "attempt_timeout",
        504,
        fault="latency=2s",
        events=("attempt_timeout",),
        attempt_modes=("attempt_timeout",),
    ),
    Case(
        "deadline",
        "/v2/models/deadline/infer",
        "deadline_exceeded",
        504,
        fault="hang",
        events=("deadline_exceeded",),
        attempt_modes=("deadline_exceeded",),
    ),
    Case(
        "firstbyte",
        "/v2/models/firstbyte/infer",
        "first_byte_timeout",
        504,
        fault="first_byte_delay=2s",
        events=("attempt_timeout",),
        attempt_modes=("first_byte_timeout",),
    ),
    Case(
        "stream",
        "/v1/chat/completions",
        "stream_stalled",
        200,
        fault="stall_mid_stream=2s",
        events=("stream_failed",),
        attempt_modes=("stream_stalled",),
        body={**CHAT, "stream": True},
    ),
    Case(
        "stream",
        "/v1/chat/completions",
        "stream_interrupted",
        200,
        fault="reset_mid_stream",
        events=("stream_failed",),
        attempt_modes=("stream_interrupted",),
        body={**CHAT, "stream": True},
    ),
    Case(
        "fivexx",
        "/v2/models/fivexx/infer",
        "upstream_5xx",
        500,
        fault="status=500",
        attempt_modes=("upstream_5xx",),
    ),
    Case(
        "ratelimit",
        "/v2/models/ratelimit/infer",
        "upstream_rate_limited",
        429,
        fault="status=429",
        attempt_modes=("upstream_rate_limited",),
    ),
    Case(
        "invalid",
        "/v2/models/invalid/infer",
        "invalid_output",
        502,
        fault="malformed_json",
        events=("validation_failed",),
        attempt_modes=("invalid_output",),
    ),
    Case(
        "circuit",
        "/v2/models/circuit/infer",
        "upstream_5xx",
        500,
        fault="status=500",
        events=("circuit_opened",),
        attempt_modes=("upstream_5xx",),
    ),
    Case("circuit", "/v2/models/circuit/infer", "circuit_open", 503, attempts=0),
    Case(
        "budget",
        "/v2/models/budget/infer",
        "upstream_5xx",
        503,
        fault="status=503",
        events=("budget_refused",),
        attempt_modes=("upstream_5xx",),
    ),
    Case("", "/nowhere", "client_error", 404, attempts=0),
]


async def send(
    http: aiohttp.ClientSession, sc: SidecarProc, case: Case, trace_id: str
) -> aiohttp.ClientResponse:
    headers = {"traceparent": traceparent(trace_id)}
    if case.fault:
        headers["x-demo-fault"] = case.fault
    async with http.post(sc.url + case.path, json=case.body or INFER, headers=headers) as resp:
        try:
            await resp.read()
        except aiohttp.ClientPayloadError:
            pass  # a non-SSE body cut visibly
        return resp


async def test_every_failure_mode_is_on_its_span_and_counted(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    otlp: OtlpReceiver,
) -> None:
    sc = start_sidecar(failure_policy(model_url), env=traced_env(otlp, ratio="0"))
    for case in CASES:
        trace_id = new_trace_id()
        resp = await send(http, sc, case, trace_id)
        assert resp.status == case.status, case
        assert resp.headers["x-trace-id"] == trace_id
        if case.status != 200:
            assert resp.headers["x-sidecar-failure-mode"] == case.mode, case
        else:  # a stream cut after its first byte: its headers said what was known then
            assert "x-sidecar-failure-mode" not in resp.headers

        spans = await otlp.wait_trace(trace_id, spans=1 + case.attempts)
        server = server_span(spans)
        a = server.attributes
        assert a["sidecar.failure_mode"] == case.mode, (case, a)
        assert a["error.type"] == case.mode
        assert a["sidecar.outcome"] == case.outcome
        assert a["http.response.status_code"] == case.status
        if case.route:
            assert a["sidecar.route"] == case.route
        expected_status = "unset" if case.mode == "client_error" else "error"
        assert server.status == expected_status, case
        if expected_status == "error":
            assert server.status_message == case.mode
        assert set(case.events) <= all_events(spans), (case, all_events(spans))

        attempts = attempt_spans(spans)
        assert len(attempts) == case.attempts, case
        for n, (attempt, mode) in enumerate(zip(attempts, case.attempt_modes, strict=True), 1):
            assert attempt.parent_span_id == server.span_id
            assert attempt.attributes["sidecar.attempt"] == n
            assert attempt.attributes.get("sidecar.failure_mode") == mode, (case, attempt)
            assert attempt.status == "error"
            if n > 1:
                assert attempt.attributes["http.request.resend_count"] == n - 1

    # Where the events sit: timeouts and validation on the attempt, the rest on the request.
    by_route = {s.attributes.get("sidecar.route"): s for s in otlp.servers()}
    timeout_trace = otlp.trace(by_route["timeout"].trace_id)
    assert attempt_spans(timeout_trace)[0].event("attempt_timeout") is not None
    assert attempt_spans(timeout_trace)[0].event("attempt_timeout").attributes["phase"] == (
        "headers"
    )
    retry = by_route["connect"].event("retry")
    assert retry is not None
    assert retry.attributes["reason"] == "connect_error" and retry.attributes["attempt"] == 2
    assert "delay" in retry.attributes
    budget = next(s for s in otlp.servers() if s.event("budget_refused"))
    assert budget.attributes["sidecar.retry.budget_refused"] is True
    opened = next(s for s in otlp.servers() if s.event("circuit_opened"))
    assert opened.event("circuit_opened").attributes["upstream"] == "model@circuit"
    stalled = next(
        s for s in otlp.servers() if s.attributes.get("sidecar.failure_mode") == "stream_stalled"
    )
    assert stalled.attributes["sidecar.stream.chunks"] >= 1

    # Each mode's counter moved, labelled by route; retries, refusals, transitions too.
    m = await scrape(http, sc)
    for case in CASES:
        route = case.route or "(none)"
        assert m.value("sidecar_failures_total", route=route, mode=case.mode) >= 1, case
    assert m.value("sidecar_failures_total", route="stream", mode="stream_stalled") == 1
    assert m.value("sidecar_requests_total", route="circuit", outcome="error") == 2
    assert m.value("sidecar_retries_total", route="connect", reason="connect_error") == 1
    assert m.value("sidecar_retry_budget_refusals_total", route="budget") == 1
    assert m.value("sidecar_breaker_transitions_total", upstream="model@circuit", to="open") == 1
    assert m.value("sidecar_breaker_state", upstream="model@circuit") == 2
    assert m.value("sidecar_breaker_state", upstream="model") == 0
    assert m.value("sidecar_upstream_attempts_total", upstream="dead", result="connect_error") == 2
    assert (
        m.value("sidecar_upstream_attempts_total", upstream="model", result="invalid_output") == 1
    )
    assert m.value("sidecar_events_total", route="invalid", event="validation_failed") == 1
    assert m.value("sidecar_events_total", route="deadline", event="deadline_exceeded") == 1
    assert m.total("sidecar_request_duration_seconds_count", route="timeout") == 1
    # Every failed request was exported although the success ratio is 0.
    assert m.value("sidecar_traces_total", decision="exported_failure") == len(CASES)
    assert m.value("sidecar_traces_total", decision="exported_success") == 0


async def test_client_cancelled_is_traced_and_counted(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    otlp: OtlpReceiver,
) -> None:
    sc = start_sidecar(failure_policy(model_url), env=traced_env(otlp))
    trace_id = new_trace_id()
    headers = {"traceparent": traceparent(trace_id), "x-demo-fault": "hang"}
    with pytest.raises((TimeoutError, aiohttp.ClientError)):
        async with http.post(
            sc.url + "/v2/models/cancel/infer",
            json=INFER,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=0.5),
        ):
            pass
    spans = await otlp.wait_trace(trace_id, spans=2)
    server = server_span(spans)
    assert server.attributes["sidecar.failure_mode"] == "client_cancelled"
    assert server.event("client_cancelled") is not None
    assert server.status == "unset"  # the caller's own doing, not the model's
    (attempt,) = attempt_spans(spans)
    assert attempt.attributes["sidecar.failure_mode"] == "client_cancelled"
    m = await scrape(http, sc)
    assert m.value("sidecar_failures_total", route="cancel", mode="client_cancelled") == 1


async def test_breaker_recovery_and_route_recovery_are_measured(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    otlp: OtlpReceiver,
) -> None:
    policy = {
        "upstreams": {
            "model": {
                "url": model_url,
                "breaker": {"consecutive_failures": 1, "open_for": "200ms", "jitter": 0},
            }
        },
        "routes": [
            {"name": "fraud", "match": {"path_prefix": "/v2"}, "retry": {"max_attempts": 1}}
        ],
    }
    sc = start_sidecar(policy, env=traced_env(otlp))
    async with http.post(
        sc.url + "/v2/models/m/infer", json=INFER, headers={"x-demo-fault": "status=500"}
    ) as resp:
        assert resp.status == 500
    # Bounded polling until the half-open probe succeeds and the circuit closes.
    deadline = time.monotonic() + 10
    while True:
        async with http.post(sc.url + "/v2/models/m/infer", json=INFER) as resp:
            await resp.read()
            if resp.status == 200:
                probe_trace = resp.headers["x-trace-id"]
                break
            assert resp.headers["x-sidecar-failure-mode"] == "circuit_open"
        assert time.monotonic() < deadline, "the circuit never closed"
        await asyncio.sleep(0.05)
    probe = server_span(await otlp.wait_trace(probe_trace, spans=2))
    assert {"circuit_half_open", "circuit_closed"} <= set(probe.event_names())
    closed = probe.event("circuit_closed")
    assert closed is not None and closed.attributes["recovery_seconds"] >= 0.2

    m = await scrape(http, sc)
    for to in ("open", "half_open", "closed"):
        assert m.value("sidecar_breaker_transitions_total", upstream="model", to=to) == 1
    assert m.value("sidecar_breaker_recovery_seconds_count", upstream="model") == 1
    assert m.value("sidecar_breaker_recovery_seconds_sum", upstream="model") >= 0.2
    assert m.value("sidecar_route_recovery_seconds_count", route="fraud") == 1
    assert m.value("sidecar_route_recovery_seconds_sum", route="fraud") >= 0.2
    assert m.value("sidecar_breaker_state", upstream="model") == 0


# -- sampling ------------------------------------------------------------------------------------


async def test_sampling_exports_every_failure_and_exactly_the_chosen_successes(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    otlp: OtlpReceiver,
) -> None:
    policy = {
        "upstreams": {"model": {"url": model_url, "breaker": {"enabled": False}}},
        "routes": [
            {"name": "fraud", "match": {"path_prefix": "/v2"}, "retry": {"max_attempts": 1}}
        ],
        # The environment beats the policy: 0.25 applies, not 0.9.
        "tracing": {"success_ratio": 0.9},
    }
    sc = start_sidecar(policy, env=traced_env(otlp, ratio="0.25"))
    step = 1 << 60  # low 64 bits i * 2**60: selected exactly when i < 0.25 * 16 = 4
    successes = [new_trace_id(low=i * step) for i in range(16)]
    # Failures whose ids would never be chosen as successes, one with the caller's sampled
    # flag off: failures are exported all the same.
    failures = [new_trace_id(low=15 * step + i) for i in range(4)]
    for i, trace_id in enumerate(successes):
        async with http.post(
            sc.url + "/v2/models/m/infer",
            json=INFER,
            headers={"traceparent": traceparent(trace_id)},
        ) as resp:
            assert resp.status == 200 and resp.headers["x-trace-id"] == trace_id, i
    for i, trace_id in enumerate(failures):
        headers = {
            "traceparent": traceparent(trace_id, flags="00" if i == 0 else "01"),
            "x-demo-fault": "status=500",
        }
        async with http.post(sc.url + "/v2/models/m/infer", json=INFER, headers=headers) as resp:
            assert resp.status == 500
    # The batch exporter sends in order: once the last failure is in, everything decided is.
    await otlp.wait_trace(failures[-1], spans=2)
    exported = {s.trace_id for s in otlp.servers()}
    assert exported == set(successes[:4]) | set(failures)
    for trace_id in exported:
        assert len(otlp.trace(trace_id)) == 2  # the whole trace: server span and its attempt
    m = await scrape(http, sc)
    assert m.value("sidecar_traces_total", decision="exported_success") == 4
    assert m.value("sidecar_traces_total", decision="exported_failure") == 4
    assert m.value("sidecar_traces_total", decision="dropped") == 12


# -- metrics -------------------------------------------------------------------------------------


async def test_metrics_endpoint_is_open_and_lists_every_family(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    policy = {"upstreams": {"model": {"url": model_url}}, "routes": [{"name": "default"}]}
    sc = start_sidecar(policy, env={"SIDECAR_ADMIN_TOKEN": "secret-admin"})
    async with http.get(sc.url + "/v1/chat/completions") as resp:
        await resp.read()
    m = await scrape(http, sc)  # no token needed
    for name, kind in FAMILIES.items():
        assert m.types.get(name) == kind, (name, m.types.get(name))
    assert m.value("sidecar_requests_in_flight") == 0
    assert m.value("sidecar_reviews_pending") == 0
    assert m.total("sidecar_requests_total", route="default") == 1


# -- alerts --------------------------------------------------------------------------------------


class Webhook:
    """A loopback webhook receiver recording every JSON body posted to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Webhook:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.json()
        async with self._changed:
            self.bodies.append(body)
            self._changed.notify_all()
        return web.Response(text="ok")

    async def wait(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                for body in self.bodies:
                    if predicate(body):
                        return body
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching webhook body; got {self.bodies}")
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    pass


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = await Webhook().start()
    yield hook
    await hook.stop()


async def test_alert_rules_post_to_the_webhook_once_per_cooldown(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    webhook: Webhook,
) -> None:
    policy = {
        "upstreams": {
            "model": {"url": model_url, "breaker": {"consecutive_failures": 1, "open_for": "60s"}},
            "other": {"url": model_url, "breaker": {"enabled": False}},
        },
        "routes": [
            {"name": "fraud", "match": {"path_prefix": "/v2"}, "retry": {"max_attempts": 1}},
            {
                "name": "chat",
                "match": {"path_prefix": "/v1"},
                "upstream": "other",
                "retry": {"max_attempts": 1},
            },
        ],
        "alerts": {
            "cooldown": "10m",
            "rules": {"failure_ratio": {"window": "1m", "threshold": 0.5, "min_requests": 3}},
        },
    }
    # The URL from the environment, the way a secret is passed.
    sc = start_sidecar(policy, env={"SIDECAR_ALERT_WEBHOOK_URL": webhook.url})

    # breaker_opened: one failure opens the circuit (consecutive_failures: 1).
    async with http.post(
        sc.url + "/v2/models/m/infer", json=INFER, headers={"x-demo-fault": "status=500"}
    ) as resp:
        assert resp.status == 500
    opened = await webhook.wait(lambda b: b["alert"] == "breaker_opened")
    assert opened["labels"] == {"upstream": "model"}
    assert opened["status"] == "firing" and opened["severity"] == "warning"
    assert opened["summary"] == "Circuit to upstream model opened"
    assert opened["source"] == "ai-resilience-sidecar"
    assert opened["fired_at"].endswith("Z") and opened["instance"]

    # failure_ratio: 2 ok then 2 failed of 4 (> 0.5 after the third failure... at 2/4 = 0.5
    # nothing; a third failure makes 3/5 = 0.6).
    for fault in (None, None, "status=500", "status=500"):
        headers = {"x-demo-fault": fault} if fault else {}
        async with http.post(sc.url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
            await r.read()
    assert not [b for b in webhook.bodies if b["alert"] == "failure_ratio"]
    async with http.post(
        sc.url + "/v1/chat/completions", json=CHAT, headers={"x-demo-fault": "status=500"}
    ) as resp:
        assert resp.status == 500
    ratio = await webhook.wait(lambda b: b["alert"] == "failure_ratio")
    assert ratio["labels"] == {"route": "chat"}
    assert ratio["value"] == pytest.approx(0.6) and ratio["threshold"] == 0.5
    assert "sidecar.route=chat" in ratio["description"]

    # Cooldown: the circuit opening again (forced by an operator) is not posted again.
    for action in ("close", "open"):
        async with http.post(sc.admin_url + f"/admin/breakers/model?action={action}") as r:
            assert r.status == 200
    async with http.post(
        sc.url + "/v1/chat/completions", json=CHAT, headers={"x-demo-fault": "status=500"}
    ) as resp:
        await resp.read()
    # Delivery is counted once the webhook answered: poll (bounded) for it.
    deadline = time.monotonic() + 10
    while True:
        m = await scrape(http, sc)
        if (
            m.value("sidecar_alerts_total", rule="failure_ratio", result="suppressed") == 1
            and m.value("sidecar_alerts_total", rule="failure_ratio", result="sent") == 1
        ):
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert m.value("sidecar_alerts_total", rule="breaker_opened", result="sent") == 1
    assert m.value("sidecar_alerts_total", rule="breaker_opened", result="suppressed") == 1
    assert m.value("sidecar_alerts_total", rule="failure_ratio", result="sent") == 1
    assert m.value("sidecar_alerts_total", rule="failure_ratio", result="suppressed") == 1
    assert [b["alert"] for b in webhook.bodies].count("breaker_opened") == 1
    alert_log = sc.rp.wait_for_log(lambda r: r.get("event") == "alert")
    assert webhook.url not in str(sc.rp.records())  # the URL is a secret: never logged
    assert alert_log["rule"] == "breaker_opened"


async def test_slack_format_and_a_dead_webhook_changes_nothing(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    webhook: Webhook,
) -> None:
    def policy(url: str) -> dict[str, Any]:
        return {
            "upstreams": {"model": {"url": model_url, "breaker": {"consecutive_failures": 1}}},
            "routes": [{"name": "fraud", "retry": {"max_attempts": 1}}],
            "alerts": {"webhook_url": url, "format": "slack", "timeout": "500ms"},
        }

    sc = start_sidecar(policy(webhook.url))
    async with http.post(
        sc.url + "/v2/models/m/infer", json=INFER, headers={"x-demo-fault": "status=500"}
    ) as resp:
        assert resp.status == 500
    body = await webhook.wait(lambda b: "text" in b)
    assert body["text"] == ":warning: [warning] Circuit to upstream model opened"
    section, context = body["blocks"]
    assert section["type"] == "section" and section["text"]["type"] == "mrkdwn"
    assert "The breaker for model opened" in section["text"]["text"]
    assert context["type"] == "context" and "`breaker_opened`" in context["elements"][0]["text"]

    # A webhook that is down: the same requests get the same answers, and complete.
    port = webhook.port
    await webhook.stop()
    dead = start_sidecar(policy(f"http://127.0.0.1:{port}/hook"))
    async with http.post(
        dead.url + "/v2/models/m/infer", json=INFER, headers={"x-demo-fault": "status=500"}
    ) as resp:
        assert resp.status == 500
        assert resp.headers["x-sidecar-failure-mode"] == "upstream_5xx"
    async with http.post(dead.url + "/v2/models/m/infer", json=INFER) as resp:
        assert resp.status == 503
        assert resp.headers["x-sidecar-failure-mode"] == "circuit_open"
    failed = dead.rp.wait_for_log(lambda r: r.get("event") == "alert_delivery_failed")
    assert failed["rule"] == "breaker_opened"


# -- a dead collector ----------------------------------------------------------------------------


async def test_a_dead_collector_changes_no_response_and_does_not_hold_up_shutdown(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    otlp: OtlpReceiver,
) -> None:
    policy = {
        "upstreams": {"model": {"url": model_url, "breaker": {"enabled": False}}},
        "routes": [{"name": "fraud", "retry": {"max_attempts": 1}}],
    }
    sc = start_sidecar(policy, env=traced_env(otlp, SIDECAR_DRAIN_GRACE="1s"))
    requests = [({}, 200), ({"x-demo-fault": "status=500"}, 500), ({"x-demo-fault": "empty"}, 200)]

    async def answers() -> list[tuple[int, str | None, str | None, bytes]]:
        out = []
        for headers, status in requests:
            async with http.post(sc.url + "/v2/models/m/infer", json=INFER, headers=headers) as r:
                body = await r.read()
                assert r.status == status
                out.append(
                    (
                        r.status,
                        r.headers.get("x-sidecar-outcome"),
                        r.headers.get("x-sidecar-failure-mode"),
                        body,
                    )
                )
        return out

    def stable(rows: list[tuple[int, str | None, str | None, bytes]]) -> list[Any]:
        # Bodies name their request (the model's id, the envelope's request and trace ids).
        def body(raw: bytes) -> Any:
            if not raw:
                return raw
            data = json.loads(raw)
            data.pop("id", None)
            data.get("error", {}).pop("request_id", None)
            data.get("error", {}).pop("trace_id", None)
            return data

        return [(s, o, f, body(b)) for s, o, f, b in rows]

    before = await answers()
    await otlp.wait_for(lambda spans: len({s.trace_id for s in spans}) >= len(requests))
    await otlp.stop()  # the collector is gone: connections are refused from now on
    after = await answers()
    assert stable(after) == stable(before)
    # Shutdown flushes within the drain period and exits cleanly (not killed after 10 s).
    started = time.monotonic()
    assert sc.rp.stop(timeout=10) == 0
    assert time.monotonic() - started < 9


# -- degradation and quality: shed, fallback, escalation, rejection ------------------------------


def quality_policy(model_url: str, hook_url: str) -> dict[str, Any]:
    gate = {
        "extract": {"kind": "kserve_v2", "output": "predict_proba", "class_index": 0},
        "auto_above": 0.9,
        "reject_below": 0.5,
        "on_review": "escalate",
        "on_reject": "request_info",
    }
    return {
        "upstreams": {
            "model": {"url": model_url, "breaker": {"enabled": False}},
            "narrow": {
                "url": model_url,
                "breaker": {"enabled": False},
                "concurrency": {"max_in_flight": 1, "queue": 0},
            },
        },
        "routes": [
            {
                "name": "shed",
                "match": {"path_prefix": "/v2/models/shed"},
                "upstream": "narrow",
                "timeouts": {"total": "5s"},
            },
            {
                "name": "degraded",
                "match": {"path_prefix": "/v2/models/degraded"},
                "upstream": "model",
                "retry": {"max_attempts": 1},
                "fallback": [{"static": {"json": {"decision": "review"}}}],
            },
            {
                "name": "gated",
                "match": {"path_prefix": "/v2/models/gated"},
                "upstream": "model",
                "confidence": gate,
            },
        ],
        "alerts": {
            "webhook_url": hook_url,
            "evaluate_every": "100ms",
            "rules": {
                "review_backlog": {"older_than": "300ms"},
                "escalation_spike": {"window": "2s", "baseline": "1m", "min_escalations": 2},
            },
        },
    }


async def test_shed_fallback_escalation_and_rejection_are_traced_counted_and_alerted(
    model_url: str,
    start_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    otlp: OtlpReceiver,
    webhook: Webhook,
) -> None:
    sc = start_sidecar(quality_policy(model_url, webhook.url), env=traced_env(otlp))
    listening = time.monotonic()  # the alert rules started watching before this

    # overloaded: one request holds the only slot, the next is shed.
    holder = asyncio.create_task(
        http.post(sc.url + "/v2/models/shed/infer", json=INFER, headers={"x-demo-fault": "hang"})
    )
    deadline = time.monotonic() + 10
    while (await demo_stats(http, model_url))["in_flight"] < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    shed_trace = new_trace_id()
    async with http.post(
        sc.url + "/v2/models/shed/infer",
        json=INFER,
        headers={"traceparent": traceparent(shed_trace)},
    ) as resp:
        assert resp.status == 503
        assert resp.headers["x-sidecar-failure-mode"] == "overloaded"
    holder.cancel()
    shed = server_span(await otlp.wait_trace(shed_trace))
    assert shed.attributes["sidecar.failure_mode"] == "overloaded"
    assert shed.status == "error" and shed.event("shed") is not None
    assert attempt_spans(otlp.trace(shed_trace)) == []

    # fallback: the model fails, the static default answers; the original mode is kept.
    async with http.post(
        sc.url + "/v2/models/degraded/infer", json=INFER, headers={"x-demo-fault": "status=500"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["x-sidecar-outcome"] == "fallback"
        assert resp.headers["x-sidecar-fallback"] == "static"
        fallback_trace = resp.headers["x-trace-id"]
    fallback = server_span(await otlp.wait_trace(fallback_trace, spans=2))
    assert fallback.attributes["sidecar.outcome"] == "fallback"
    assert fallback.attributes["sidecar.fallback.kind"] == "static"
    assert fallback.attributes["sidecar.failure_mode"] == "upstream_5xx"
    assert fallback.status == "error"  # the caller got a safe default, not the model's answer
    assert fallback.event("fallback") is not None

    # escalated: a review-band answer is queued; its review id is on the span. The spike rule
    # compares its 2 s window with the time before it: that history must exist first.
    await asyncio.sleep(max(0.0, listening + 2.2 - time.monotonic()))
    escalated_traces = []
    for _ in range(2):
        async with http.post(
            sc.url + "/v2/models/gated/infer",
            json=INFER,
            headers={"x-demo-fault": "confidence=0.7"},
        ) as resp:
            assert resp.status == 202
            assert resp.headers["x-sidecar-outcome"] == "escalated"
            review_id = resp.headers["x-sidecar-review-id"]
            escalated_traces.append((resp.headers["x-trace-id"], review_id))
    for trace_id, review_id in escalated_traces:
        span = server_span(await otlp.wait_trace(trace_id, spans=2))
        assert span.attributes["sidecar.outcome"] == "escalated"
        assert span.attributes["sidecar.review.id"] == review_id
        assert span.attributes["sidecar.confidence"] == pytest.approx(0.7)
        assert span.attributes["sidecar.failure_mode"] == "low_confidence"
        event = span.event("escalated")
        assert event is not None and event.attributes["review_id"] == review_id

    # rejected: a reject-band answer asks for more information (422).
    async with http.post(
        sc.url + "/v2/models/gated/infer", json=INFER, headers={"x-demo-fault": "confidence=0.2"}
    ) as resp:
        assert resp.status == 422
        assert resp.headers["x-sidecar-outcome"] == "rejected"
        rejected_trace = resp.headers["x-trace-id"]
    rejected = server_span(await otlp.wait_trace(rejected_trace, spans=2))
    assert rejected.attributes["sidecar.failure_mode"] == "low_confidence"
    assert rejected.status == "error"

    # Alerts: the escalation burst and the waiting reviews.
    spike = await webhook.wait(lambda b: b["alert"] == "escalation_spike")
    assert spike["labels"] == {"route": "gated"}
    backlog = await webhook.wait(lambda b: b["alert"] == "review_backlog")
    assert "2 request(s) wait for human review" in backlog["description"]

    m = await scrape(http, sc)
    assert m.value("sidecar_failures_total", route="shed", mode="overloaded") == 1
    assert m.value("sidecar_shed_total", route="shed") == 1
    assert m.value("sidecar_fallbacks_total", route="degraded", kind="static") == 1
    assert m.value("sidecar_failures_total", route="degraded", mode="upstream_5xx") == 1
    assert m.value("sidecar_requests_total", route="degraded", outcome="fallback") == 1
    assert m.value("sidecar_escalations_total", route="gated") == 2
    assert m.value("sidecar_requests_total", route="gated", outcome="escalated") == 2
    assert m.value("sidecar_requests_total", route="gated", outcome="rejected") == 1
    assert m.value("sidecar_failures_total", route="gated", mode="low_confidence") == 3
    assert m.value("sidecar_reviews_pending") == 2
    assert m.value("sidecar_review_oldest_pending_seconds") > 0
