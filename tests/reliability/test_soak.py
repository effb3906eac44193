"""A 60-second mixed-fault soak of the real `sidecar run` in front of the real demo model.

Every request's fault is chosen here (seeded) and sent in `x-demo-fault`, keyed by the request's
`x-request-id`, so what the caller saw can be checked request by request against what that fault
must produce under the soak policy below: no unexplained error, and the access log agrees with the
caller. The rate is fixed (open loop: each request is sent at its scheduled time whatever the
earlier ones did) and the number of requests bounded. The sidecar's RSS, read from
/proc/<pid>/status at the start, the middle and the end, must not grow past a generous bound.

Expected outcomes, per route (each entry a set: retries and the breaker make some outcomes one of
a few; every set is explained where it is built):

- `chat` (`/v1/chat/completions`, not idempotent, no fallback, JSON validated): the model's own
  5xx/429 pass through with `upstream_5xx`/`upstream_rate_limited`; the sidecar's own errors carry
  the envelope (`invalid_output` 502, `attempt_timeout` 504, `deadline_exceeded` 504 from the
  caller's `x-request-timeout`, `connect_error` 502 after retries, `first_byte_timeout` 504). SSE
  failures after the first byte keep the first byte's headers (200, `ok`) and end with a final
  `event: error` naming the mode (`stream_interrupted`, `stream_stalled`) and no `[DONE]`.
- `infer` (`/v2/models/...`, idempotent, confidence gate, static fallback): every availability
  failure is answered by the static fallback (200, `x-sidecar-outcome: fallback`,
  `x-sidecar-fallback: static`) while `x-sidecar-failure-mode` keeps the original cause; a
  review-band answer is escalated (202, `low_confidence`, a review id); a reject-band answer takes
  the fallback with `low_confidence`.
- Both routes share one upstream, hence one breaker: once it opened (or while its one half-open
  probe is out), any request may instead fail fast with `circuit_open` (503 + Retry-After on
  `chat`; the static fallback with `circuit_open` on `infer`), including healthy ones and a retry
  of a failed one (the caller sees the last attempt's mode). The access log must then show the
  breaker open or half-open for that request.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from tests.conftest import SidecarFactory

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
INFER = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [1.0, 2.0]}]}
STATIC = {"decision": "review", "reason": "model_unavailable"}

RATE = 25.0  # requests per second, open loop
DURATION = 60.0  # seconds of sending
RSS_GROWTH_LIMIT = 50 * 1024 * 1024
CALLER_DEADLINE = "0.6"  # x-request-timeout for `hang`: the caller's own deadline


def soak_policy(model_url: str) -> dict[str, Any]:
    # Timeouts are far above a healthy answer's latency even on a loaded 2-core machine, and the
    # injected delays far above the timeouts, so no healthy request can time out by accident.
    return {
        "upstreams": {
            "model": {
                "url": model_url,
                "breaker": {
                    "consecutive_failures": 8,
                    "failure_ratio": 0.6,
                    "min_calls": 40,
                    "window": "10s",
                    "open_for": "500ms",
                    "open_for_max": "2s",
                    "half_open_probes": 1,
                },
            }
        },
        "routes": [
            {
                "name": "chat",
                "match": {"path_prefix": "/v1/chat/completions", "methods": ["POST"]},
                "upstream": "model",
                "timeouts": {
                    "total": "5s",
                    "attempt": "1500ms",
                    "connect": "500ms",
                    "first_byte": "1500ms",
                    "stream_idle": "1500ms",
                },
                "retry": {"max_attempts": 3, "backoff": {"base": "10ms", "max": "50ms"}},
                "validate": {},
            },
            {
                "name": "infer",
                "match": {"path_prefix": "/v2/models/", "methods": ["POST"]},
                "upstream": "model",
                "idempotent": True,
                "timeouts": {"total": "5s", "attempt": "1500ms", "connect": "500ms"},
                "retry": {"max_attempts": 2, "backoff": {"base": "10ms", "max": "50ms"}},
                "validate": {},
                "confidence": {
                    # The probability of class 0 is what the demo's `confidence=` sets.
                    "extract": {"kind": "kserve_v2", "output": "predict_proba", "class_index": 0},
                    "auto_above": 0.9,
                    "reject_below": 0.5,
                    "on_review": "escalate",
                    "on_reject": "fallback",
                },
                "fallback": [{"static": {"status": 200, "json": STATIC}}],
            },
        ],
    }


@dataclass(frozen=True)
class Seen:
    """What the caller saw: status, `x-sidecar-outcome`, `x-sidecar-failure-mode`,
    `x-sidecar-fallback`, and for SSE how the stream ended (`done` or the error event's mode)."""

    status: int
    outcome: str
    mode: str | None = None
    fallback: str | None = None
    stream_end: str | None = None


def error(status: int, mode: str) -> Seen:
    return Seen(status, "error", mode)


def fell_back(mode: str) -> Seen:
    return Seen(200, "fallback", mode, "static")


CHAT_OPEN = error(503, "circuit_open")  # the breaker is open: fail fast, nothing retried
INFER_OPEN = fell_back("circuit_open")  # ... and `infer` answers it from the static fallback


@dataclass(frozen=True)
class Case:
    name: str
    route: str  # chat | infer
    fault: str
    expect: frozenset[Seen]
    stream: bool = False
    caller_deadline: str | None = None


def case(name: str, route: str, fault: str, *expect: Seen, **kw: Any) -> Case:
    breaker_open = CHAT_OPEN if route == "chat" else INFER_OPEN
    return Case(name, route, fault, frozenset({*expect, breaker_open}), **kw)


CASES: list[tuple[Case, float]] = [
    # -- chat, JSON ---------------------------------------------------------------------------
    (case("chat_ok", "chat", "", Seen(200, "ok")), 30),
    # 503 is retried on any route; the last attempt's 503 passes through.
    (case("chat_503", "chat", "status=503", error(503, "upstream_5xx")), 3),
    # Other 5xx are not retried on a route that is not idempotent.
    (case("chat_500", "chat", "status=500", error(500, "upstream_5xx")), 3),
    (case("chat_429", "chat", "status=429", error(429, "upstream_rate_limited")), 2),
    (case("chat_malformed", "chat", "malformed_json", error(502, "invalid_output")), 3),
    # One attempt only (a timeout is retried only on idempotent routes).
    (case("chat_slow", "chat", "latency=2500ms", error(504, "attempt_timeout")), 2),
    # The caller's own deadline is shorter than the attempt timeout.
    (
        case(
            "chat_hang",
            "chat",
            "hang",
            error(504, "deadline_exceeded"),
            caller_deadline=CALLER_DEADLINE,
        ),
        2,
    ),
    # A reset before any response is a connect error, retried on every route.
    (case("chat_reset", "chat", "reset", error(502, "connect_error")), 3),
    # -- chat, SSE ----------------------------------------------------------------------------
    (case("sse_ok", "chat", "", Seen(200, "ok", stream_end="done"), stream=True), 15),
    # Cut after the first event: the caller got the first byte (200, ok), then `event: error`.
    # If the cut reaches the sidecar before it read the first `data:` line, nothing was sent
    # yet and the caller gets the envelope instead (not retried: the route is not idempotent).
    (
        case(
            "sse_cut",
            "chat",
            "reset_mid_stream",
            Seen(200, "ok", stream_end="stream_interrupted"),
            error(502, "stream_interrupted"),
            stream=True,
        ),
        4,
    ),
    (
        case(
            "sse_stall",
            "chat",
            "stall_mid_stream=4s",
            Seen(200, "ok", stream_end="stream_stalled"),
            stream=True,
        ),
        2,
    ),
    (
        case(
            "sse_no_first_byte",
            "chat",
            "first_byte_delay=3s",
            error(504, "first_byte_timeout"),
            stream=True,
        ),
        2,
    ),
    # -- infer: gated, idempotent, static fallback -------------------------------------------
    (case("infer_ok", "infer", "", Seen(200, "ok")), 15),
    (case("infer_503", "infer", "status=503", fell_back("upstream_5xx")), 2),
    (case("infer_500", "infer", "status=500", fell_back("upstream_5xx")), 2),
    (case("infer_malformed", "infer", "malformed_json", fell_back("invalid_output")), 2),
    # Retried once (idempotent); the second attempt may run into the total deadline.
    (
        case(
            "infer_slow",
            "infer",
            "latency=2500ms",
            fell_back("attempt_timeout"),
            fell_back("deadline_exceeded"),
        ),
        1,
    ),
    (
        case(
            "infer_hang",
            "infer",
            "hang",
            fell_back("deadline_exceeded"),
            caller_deadline=CALLER_DEADLINE,
        ),
        1,
    ),
    (case("infer_reset", "infer", "reset", fell_back("connect_error")), 2),
    # Review band (0.5 <= c < 0.9): queued durably, 202 with a review id.
    (case("infer_review", "infer", "confidence=0.7", Seen(202, "escalated", "low_confidence")), 2),
    # Reject band: the fallback chain answers; the cause stays `low_confidence`.
    (case("infer_reject", "infer", "confidence=0.2", fell_back("low_confidence")), 2),
]


@dataclass
class Result:
    case: Case
    seen: Seen | None = None
    problem: str | None = None
    latency: float = 0.0
    late: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def parse_sse_end(body: bytes) -> str:
    """`done` for a clean end; the error event's failure mode for a visible cut; else `cut`."""
    if b"event: error" in body:
        after = body.split(b"event: error", 1)[1]
        if b"[DONE]" in after:
            return "done_after_error"
        data = after.split(b"data: ", 1)[1].split(b"\n", 1)[0]
        err = json.loads(data)["error"]
        return str(err["failure_mode"])
    if body.rstrip().endswith(b"data: [DONE]"):
        return "done"
    return "cut"


async def send(
    http: aiohttp.ClientSession, base: str, request_id: str, c: Case, scheduled: float
) -> Result:
    res = Result(c, late=max(0.0, time.monotonic() - scheduled))
    headers = {"x-request-id": request_id}
    if c.fault:
        headers["x-demo-fault"] = c.fault
    if c.caller_deadline:
        headers["x-request-timeout"] = c.caller_deadline
    if c.route == "chat":
        url, payload = base + "/v1/chat/completions", {**CHAT, "stream": c.stream}
    else:
        url, payload = base + "/v2/models/soak/infer", INFER
    try:
        async with http.post(url, json=payload, headers=headers) as resp:
            body = await resp.read()
            h = resp.headers
            if h.get("x-request-id") != request_id:
                res.problem = f"x-request-id {h.get('x-request-id')!r} is not the one sent"
            stream_end = None
            if "text/event-stream" in h.get("Content-Type", ""):
                stream_end = parse_sse_end(body)
            res.seen = Seen(
                resp.status,
                h.get("x-sidecar-outcome", "?"),
                h.get("x-sidecar-failure-mode"),
                h.get("x-sidecar-fallback"),
                stream_end,
            )
            res.details = {"body": body[:300], "retry_after": h.get("Retry-After")}
            check_body(res, body, h)
    except (aiohttp.ClientError, TimeoutError) as exc:
        res.problem = f"client error: {type(exc).__name__}: {exc}"
    except (ValueError, KeyError, IndexError) as exc:  # a body that is not what it should be
        res.problem = f"unreadable answer: {type(exc).__name__}: {exc}"
    res.latency = time.monotonic() - scheduled
    return res


def check_body(res: Result, body: bytes, headers: Any) -> None:
    """The body matches the headers: an envelope names the same mode, a fallback is the static
    answer, an escalation names its review, an open circuit says when to come back."""
    seen = res.seen
    assert seen is not None
    if seen.outcome == "error" and seen.mode not in ("upstream_5xx", "upstream_rate_limited"):
        err = json.loads(body)["error"]
        if err["failure_mode"] != seen.mode or err["request_id"] != headers["x-request-id"]:
            res.problem = f"envelope {err} does not match the headers"
    if seen.mode == "circuit_open" and seen.outcome == "error" and not headers.get("Retry-After"):
        res.problem = "circuit_open without Retry-After"
    if seen.fallback == "static" and json.loads(body) != STATIC:
        res.problem = f"fallback body {body[:200]!r} is not the static answer"
    if seen.outcome == "escalated":
        review = json.loads(body)
        if review.get("review_id") != headers.get("x-sidecar-review-id"):
            res.problem = f"escalation body {review} does not name the review"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_mixed_fault_soak(model_url: str, start_sidecar: SidecarFactory) -> None:
    sc = start_sidecar(soak_policy(model_url))
    pid = int(sc.rp.ready["pid"])
    rng = random.Random(20240612)
    cases = [c for c, _ in CASES]
    weights = [w for _, w in CASES]
    total = int(RATE * DURATION)
    plan = [(f"soak-{i:05d}", rng.choices(cases, weights)[0]) for i in range(total)]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
    ) as http:
        # Warm-up: every route and lazily built piece once, so the RSS baseline is not the import.
        warm = [c for c in cases if not c.fault]
        for i, c in enumerate(warm * 5):
            r = await send(http, sc.url, f"warm-{i}", c, time.monotonic())
            assert r.problem is None and r.seen is not None and r.seen.outcome == "ok", r
        rss = {"start": rss_bytes(pid)}
        tasks: list[asyncio.Task[Result]] = []
        t0 = time.monotonic()
        for i, (request_id, c) in enumerate(plan):
            scheduled = t0 + i / RATE
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the open-loop schedule, not a settle wait
            tasks.append(asyncio.create_task(send(http, sc.url, request_id, c, scheduled)))
            if i == total // 2:
                rss["middle"] = rss_bytes(pid)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        rss["end"] = rss_bytes(pid)

    # Every request is explained by its own fault.
    unexplained = []
    for (request_id, c), r in zip(plan, results, strict=True):
        if r.problem is not None or r.seen not in c.expect:
            unexplained.append((request_id, c.name, c.fault, r.seen, r.problem, r.details))
    if unexplained:
        ids = {u[0] for u in unexplained}
        logs = [rec for rec in sc.rp.records() if rec.get("request_id") in ids]
        raise AssertionError(
            f"{len(unexplained)} unexplained: {unexplained[:10]}; log: {logs[:20]}"
        )

    # The access log tells the same story, once per request.
    expected_ids = {request_id for request_id, _ in plan}

    def logged() -> dict[str, dict[str, Any]]:
        return {
            rec["request_id"]: rec
            for rec in sc.rp.records()
            if rec.get("event") == "request" and rec.get("request_id") in expected_ids
        }

    deadline = time.monotonic() + 15
    lines = logged()
    while len(lines) < total and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # bounded wait for the log reader thread
        lines = logged()
    assert len(lines) == total
    counts = Counter(
        rec["request_id"]
        for rec in sc.rp.records()
        if rec.get("event") == "request" and rec.get("request_id") in expected_ids
    )
    assert set(counts.values()) == {1}
    mismatched = []
    for (request_id, _c), r in zip(plan, results, strict=True):
        rec, seen = lines[request_id], r.seen
        assert seen is not None
        mode = seen.mode
        if seen.stream_end not in (None, "done"):
            mode = seen.stream_end  # the cut came after the headers
        want_outcome = "error" if seen.stream_end not in (None, "done") else seen.outcome
        if (rec["status"], rec["failure_mode"], rec["outcome"], rec["fallback"]) != (
            seen.status,
            mode,
            want_outcome,
            seen.fallback,
        ):
            mismatched.append((request_id, rec, seen))
        elif mode == "circuit_open" and rec["breaker_state"] not in ("open", "half-open"):
            mismatched.append((request_id, rec, seen))
    assert not mismatched, f"{len(mismatched)} log lines disagree: {mismatched[:5]}"

    # The breaker really opened at some point, so its interplay with every fault was exercised.
    assert any(r.seen and r.seen.mode == "circuit_open" for r in results)

    # Bounded memory.
    growth = rss["end"] - rss["start"]
    by_case = Counter(
        (c.name, r.seen.mode if r.seen else None) for (_, c), r in zip(plan, results, strict=True)
    )
    late = sum(1 for r in results if r.late > 0.05)
    print(
        f"\nsoak: {total} requests at {RATE:g} rps, late sends {late}, "
        f"rss MiB start {rss['start'] / 2**20:.1f} middle {rss['middle'] / 2**20:.1f} "
        f"end {rss['end'] / 2**20:.1f}; circuit_open "
        f"{sum(1 for r in results if r.seen and r.seen.mode == 'circuit_open')}\n"
        + "\n".join(f"  {k}: {v}" for k, v in sorted(by_case.items(), key=str))
    )
    assert growth < RSS_GROWTH_LIMIT, rss


@pytest.mark.timeout(60)
async def test_a_cut_stream_leaves_the_connection_usable(
    model_url: str, start_sidecar: SidecarFactory
) -> None:
    """Found by the soak: the connection used to be closed after the final `event: error`
    although the headers had promised keep-alive, so the caller's next request on it failed
    with a reset. The error event and the chunked end frame the answer: the connection stays."""
    sc = start_sidecar(soak_policy(model_url))
    created: list[object] = []
    trace = aiohttp.TraceConfig()

    async def on_create(*_: object) -> None:
        created.append(object())

    trace.on_connection_create_end.append(on_create)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1), trace_configs=[trace]
    ) as http:
        for i in range(10):
            cut = Case("sse_cut", "chat", "reset_mid_stream", frozenset(), stream=True)
            r = await send(http, sc.url, f"cut-{i}", cut, time.monotonic())
            assert r.problem is None, r
            assert r.seen == Seen(200, "ok", stream_end="stream_interrupted"), r
            ok = await send(http, sc.url, f"next-{i}", CASES[0][0], time.monotonic())
            assert ok.problem is None and ok.seen == Seen(200, "ok"), ok
    assert len(created) == 1  # every request went over the one connection
