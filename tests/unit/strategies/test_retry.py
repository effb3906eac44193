"""RetryStrategy: what is retried, how often, how long it waits, and what the budget allows."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from sidecar.clock import FakeClock
from sidecar.errors import FailureMode, SidecarError
from sidecar.pipeline import ProxyResponse, RequestBody, compose
from sidecar.strategies.breaker import BreakerConfig, BreakerStrategy, CircuitBreaker
from sidecar.strategies.budget import RetryBudget, RetryBudgetConfig
from sidecar.strategies.latency import LatencyTracker
from sidecar.strategies.retry import RetryConfig, RetryStrategy, parse_retry_after
from tests.unit.strategies.scripted import (
    ClosableBytesBody,
    Scripted,
    make_ctx,
    make_request,
    response,
)


def err(mode: FailureMode) -> SidecarError:
    return SidecarError(mode, f"scripted {mode.value}")


def names(ctx_events: list[object]) -> list[str]:
    return [e.name for e in ctx_events]  # type: ignore[attr-defined]


def generous_budget(clock: FakeClock) -> RetryBudget:
    return RetryBudget(RetryBudgetConfig(ratio=100.0, min_per_second=0.0, ttl=10.0), clock)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def run(
    strategy: RetryStrategy, script: Scripted, clock: FakeClock, **ctx_fields: object
) -> tuple[ProxyResponse, object]:
    ctx = make_ctx(clock, **ctx_fields)
    result = await strategy(make_request(), ctx, script)
    return result, ctx


# -- attempts ----------------------------------------------------------------------------------


async def test_success_first_time_makes_one_call_and_no_events(clock: FakeClock) -> None:
    ok = response(200)
    script = Scripted(ok)
    ctx = make_ctx(clock)
    result = await RetryStrategy(RetryConfig())(make_request(), ctx, script)
    assert result is ok
    assert script.calls == 1
    assert ctx.retries == 0
    assert ctx.failure_mode is None
    assert ctx.events == []
    assert clock.sleeps == []


@pytest.mark.parametrize("max_attempts", [1, 2, 3, 5])
async def test_stops_after_max_attempts_and_raises_last_error(
    clock: FakeClock, max_attempts: int
) -> None:
    script = Scripted(*[err(FailureMode.CONNECT_ERROR) for _ in range(max_attempts)])
    ctx = make_ctx(clock)
    strategy = RetryStrategy(RetryConfig(max_attempts=max_attempts))
    with pytest.raises(SidecarError) as info:
        await strategy(make_request(), ctx, script)
    assert info.value.mode == FailureMode.CONNECT_ERROR
    assert script.calls == max_attempts
    assert ctx.attempts == max_attempts
    assert ctx.retries == max_attempts - 1
    retries = [e for e in ctx.events if e.name == "retry"]
    assert [e.attrs["attempt"] for e in retries] == list(range(2, max_attempts + 1))
    assert len(clock.sleeps) == max_attempts - 1


async def test_recovers_on_a_later_attempt(clock: FakeClock) -> None:
    ok = response(200)
    script = Scripted(err(FailureMode.CONNECT_ERROR), response(503), ok)
    ctx = make_ctx(clock)
    result = await RetryStrategy(RetryConfig(max_attempts=3))(make_request(), ctx, script)
    assert result is ok
    assert script.calls == 3
    assert ctx.retries == 2
    assert ctx.failure_mode is None


# -- what is retried ---------------------------------------------------------------------------

DEFAULT_RETRYABLE = {
    "connect_error": lambda: err(FailureMode.CONNECT_ERROR),
    "raw_connection_refused": lambda: ConnectionRefusedError("refused"),
    "429": lambda: response(429),
    "503": lambda: response(503),
}

IDEMPOTENT_ONLY = {
    "attempt_timeout": lambda: err(FailureMode.ATTEMPT_TIMEOUT),
    "raw_timeout": lambda: TimeoutError(),
    "first_byte_timeout": lambda: err(FailureMode.FIRST_BYTE_TIMEOUT),
    "invalid_output": lambda: err(FailureMode.INVALID_OUTPUT),
    "stream_interrupted": lambda: err(FailureMode.STREAM_INTERRUPTED),
    "500": lambda: response(500),
    "502": lambda: response(502),
    "504": lambda: response(504),
}

NEVER = {
    "circuit_open": lambda: err(FailureMode.CIRCUIT_OPEN),
    "deadline_exceeded": lambda: err(FailureMode.DEADLINE_EXCEEDED),
    "client_error": lambda: err(FailureMode.CLIENT_ERROR),
    "overloaded": lambda: err(FailureMode.OVERLOADED),
    "400": lambda: response(400),
    "404": lambda: response(404),
    "200": lambda: response(200),
}


async def _first_then_ok(
    clock: FakeClock, first: object, *, idempotent: bool
) -> tuple[Scripted, object, object, RetryBudget]:
    ok = response(200, b'{"ok": true}')
    script = Scripted(first, ok)  # type: ignore[arg-type]
    ctx = make_ctx(clock)
    budget = generous_budget(clock)
    strategy = RetryStrategy(RetryConfig(max_attempts=3, idempotent=idempotent), budget=budget)
    try:
        outcome: object = await strategy(make_request(), ctx, script)
    except BaseException as exc:
        outcome = exc
    return script, ctx, outcome, budget


@pytest.mark.parametrize("idempotent", [False, True])
@pytest.mark.parametrize("kind", sorted(DEFAULT_RETRYABLE))
async def test_retried_by_default(clock: FakeClock, kind: str, idempotent: bool) -> None:
    script, ctx, outcome, budget = await _first_then_ok(
        clock, DEFAULT_RETRYABLE[kind](), idempotent=idempotent
    )
    assert script.calls == 2
    assert isinstance(outcome, ProxyResponse) and outcome.status == 200
    assert ctx.retries == 1  # type: ignore[attr-defined]
    assert budget.withdrawn == 1


@pytest.mark.parametrize("kind", sorted(IDEMPOTENT_ONLY))
async def test_not_retried_on_non_idempotent_route(clock: FakeClock, kind: str) -> None:
    first = IDEMPOTENT_ONLY[kind]()
    script, ctx, outcome, budget = await _first_then_ok(clock, first, idempotent=False)
    assert script.calls == 1
    assert ctx.retries == 0  # type: ignore[attr-defined]
    assert budget.withdrawn == 0
    assert outcome is first


@pytest.mark.parametrize("kind", sorted(IDEMPOTENT_ONLY))
async def test_retried_on_idempotent_route(clock: FakeClock, kind: str) -> None:
    script, ctx, outcome, _ = await _first_then_ok(clock, IDEMPOTENT_ONLY[kind](), idempotent=True)
    assert script.calls == 2
    assert isinstance(outcome, ProxyResponse) and outcome.status == 200
    assert ctx.retries == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("idempotent", [False, True])
@pytest.mark.parametrize("kind", sorted(NEVER))
async def test_never_retried(clock: FakeClock, kind: str, idempotent: bool) -> None:
    first = NEVER[kind]()
    script, ctx, outcome, budget = await _first_then_ok(clock, first, idempotent=idempotent)
    assert script.calls == 1
    assert outcome is first
    assert ctx.retries == 0  # type: ignore[attr-defined]
    assert budget.withdrawn == 0
    assert budget.refused == 0
    assert "retry" not in names(ctx.events)  # type: ignore[attr-defined]


async def test_cancellation_is_never_retried(clock: FakeClock) -> None:
    script = Scripted(asyncio.CancelledError(), response(200))
    ctx = make_ctx(clock)
    strategy = RetryStrategy(RetryConfig(max_attempts=3, idempotent=True))
    with pytest.raises(asyncio.CancelledError):
        await strategy(make_request(), ctx, script)
    assert script.calls == 1
    assert ctx.retries == 0


async def test_open_circuit_from_inner_breaker_stops_retrying(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        "model", BreakerConfig(consecutive_failures=2, min_calls=100, jitter=0.0), clock
    )
    script = Scripted(*[err(FailureMode.CONNECT_ERROR) for _ in range(5)])
    handler = compose(
        [RetryStrategy(RetryConfig(max_attempts=5)), BreakerStrategy(breaker)], script
    )
    ctx = make_ctx(clock)
    with pytest.raises(SidecarError) as info:
        await handler(make_request(), ctx)
    # Two attempts trip the breaker; the third is refused by it and not retried.
    assert info.value.mode == FailureMode.CIRCUIT_OPEN
    assert script.calls == 2
    assert ctx.retries == 2


# -- the final answer --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "mode"),
    [(503, FailureMode.UPSTREAM_5XX), (429, FailureMode.UPSTREAM_RATE_LIMITED)],
)
async def test_final_failing_response_is_passed_through(
    clock: FakeClock, status: int, mode: FailureMode
) -> None:
    answers = [response(status, f"answer {i}".encode()) for i in range(3)]
    script = Scripted(*answers)
    ctx = make_ctx(clock)
    result = await RetryStrategy(RetryConfig(max_attempts=3))(make_request(), ctx, script)
    assert result is answers[-1]
    assert ctx.failure_mode == mode
    assert await result.body.read_chunk() == b"answer 2"
    # Discarded attempts' bodies are released; the one handed back is not.
    closed = [a.body.closed for a in answers]  # type: ignore[attr-defined]
    assert closed == [True, True, False]


async def test_non_retryable_failing_response_sets_failure_mode(clock: FakeClock) -> None:
    bad = response(500)
    script = Scripted(bad)
    ctx = make_ctx(clock)
    result = await RetryStrategy(RetryConfig(idempotent=False))(make_request(), ctx, script)
    assert result is bad
    assert ctx.failure_mode == FailureMode.UPSTREAM_5XX


async def test_success_after_retry_leaves_failure_mode_unset(clock: FakeClock) -> None:
    script = Scripted(response(503), response(200))
    ctx = make_ctx(clock)
    await RetryStrategy(RetryConfig())(make_request(), ctx, script)
    assert ctx.failure_mode is None


# -- events ------------------------------------------------------------------------------------


async def test_retry_event_carries_delay_reason_and_status(clock: FakeClock) -> None:
    script = Scripted(response(503), err(FailureMode.CONNECT_ERROR), response(200))
    ctx = make_ctx(clock)
    strategy = RetryStrategy(RetryConfig(max_attempts=3), rng=random.Random(3))
    await strategy(make_request(), ctx, script)
    retries = [e for e in ctx.events if e.name == "retry"]
    assert [e.attrs["reason"] for e in retries] == ["upstream_5xx", "connect_error"]
    assert [e.attrs["status"] for e in retries] == [503, None]
    assert [e.attrs["attempt"] for e in retries] == [2, 3]
    assert [e.attrs["delay"] for e in retries] == [round(s, 4) for s in clock.sleeps]


async def test_events_reach_the_sink(clock: FakeClock) -> None:
    seen: list[str] = []
    script = Scripted(response(503), response(200))
    ctx = make_ctx(clock, sink=lambda event, c: seen.append(event.name))
    await RetryStrategy(RetryConfig())(make_request(), ctx, script)
    assert seen == ["retry"]


# -- backoff -----------------------------------------------------------------------------------


async def test_full_jitter_backoff_stays_within_exponential_ceilings() -> None:
    base, cap, attempts = 0.1, 0.3, 5
    ceilings = [min(cap, base * 2**i) for i in range(attempts - 1)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.3, 0.3])
    fractions: list[float] = []
    for seed in range(40):
        clock = FakeClock()
        script = Scripted(*[response(503) for _ in range(attempts)])
        strategy = RetryStrategy(
            RetryConfig(max_attempts=attempts, backoff_base=base, backoff_max=cap),
            rng=random.Random(seed),
        )
        await strategy(make_request(), make_ctx(clock), script)
        assert len(clock.sleeps) == attempts - 1
        for slept, ceiling in zip(clock.sleeps, ceilings, strict=True):
            assert 0.0 <= slept <= ceiling
            fractions.append(slept / ceiling)
    # Full jitter spreads over the whole [0, ceiling] range (not fixed, not "equal jitter").
    assert min(fractions) < 0.1
    assert max(fractions) > 0.9


async def test_same_seed_gives_same_delays() -> None:
    delays = []
    for _ in range(2):
        clock = FakeClock()
        strategy = RetryStrategy(RetryConfig(max_attempts=4), rng=random.Random(42))
        await strategy(make_request(), make_ctx(clock), Scripted(*[response(503)] * 4))
        delays.append(clock.sleeps)
    assert delays[0] == delays[1]
    assert len(set(delays[0])) == 3


async def test_retry_after_is_honoured(clock: FakeClock) -> None:
    limited = response(429, headers=[("Retry-After", "2")])
    script = Scripted(limited, response(200))
    ctx = make_ctx(clock)
    strategy = RetryStrategy(RetryConfig(backoff_base=0.01, backoff_max=0.05))
    await strategy(make_request(), ctx, script)
    assert clock.sleeps == [2.0]
    assert ctx.events[0].attrs["delay"] == 2.0


async def test_retry_after_is_a_floor_not_a_ceiling(clock: FakeClock) -> None:
    # Backoff longer than Retry-After: the longer wait wins.
    strategy = RetryStrategy(RetryConfig(backoff_base=5.0, backoff_max=5.0), rng=_MaxRandom())
    script = Scripted(response(503, headers=[("Retry-After", "1")]), response(200))
    await strategy(make_request(), make_ctx(clock), script)
    assert clock.sleeps == [5.0]


async def test_retry_after_ignored_when_not_honoured(clock: FakeClock) -> None:
    script = Scripted(response(429, headers=[("Retry-After", "30")]), response(200))
    strategy = RetryStrategy(
        RetryConfig(backoff_base=0.01, backoff_max=0.05, honour_retry_after=False)
    )
    await strategy(make_request(), make_ctx(clock), script)
    assert len(clock.sleeps) == 1
    assert clock.sleeps[0] <= 0.01


@pytest.mark.parametrize("value", ["soon", "Wed, 21 Oct 2015 07:28:00 GMT", "-1", ""])
async def test_unusable_retry_after_falls_back_to_backoff(clock: FakeClock, value: str) -> None:
    script = Scripted(response(503, headers=[("Retry-After", value)]), response(200))
    strategy = RetryStrategy(RetryConfig(backoff_base=0.01, backoff_max=0.05))
    await strategy(make_request(), make_ctx(clock), script)
    assert len(clock.sleeps) == 1
    assert 0.0 <= clock.sleeps[0] <= 0.01


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("3", 3.0),
        (" 1.5 ", 1.5),
        (None, None),
        ("", None),
        ("abc", None),
        ("-2", None),
        ("86400", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


async def test_retry_after_longer_than_the_deadline_skips_the_retry(clock: FakeClock) -> None:
    limited = response(429, headers=[("Retry-After", "5")])
    script = Scripted(limited, response(200))
    budget = generous_budget(clock)
    ctx = make_ctx(clock, deadline=clock.monotonic() + 2.0)
    result = await RetryStrategy(RetryConfig(), budget=budget)(make_request(), ctx, script)
    assert result is limited
    assert script.calls == 1
    assert clock.sleeps == []
    assert ctx.failure_mode == FailureMode.UPSTREAM_RATE_LIMITED
    assert [(e.name, e.attrs["reason"]) for e in ctx.events] == [("retry_skipped", "deadline")]
    assert budget.withdrawn == 0


# -- what stops a retry ------------------------------------------------------------------------


async def _stream(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_non_replayable_body_is_not_retried(clock: FakeClock) -> None:
    body = RequestBody(None, rest=_stream([b"rest"]), prefix=b"prefix")
    assert not body.replayable
    first = response(503)
    script = Scripted(first, response(200))
    budget = generous_budget(clock)
    ctx = make_ctx(clock)
    strategy = RetryStrategy(RetryConfig(max_attempts=3, idempotent=True), budget=budget)
    result = await strategy(make_request(body), ctx, script)
    assert result is first
    assert script.calls == 1
    assert ctx.retries == 0
    assert ctx.failure_mode == FailureMode.UPSTREAM_5XX
    skipped = [e for e in ctx.events if e.name == "retry_skipped"]
    assert [e.attrs["reason"] for e in skipped] == ["body_not_replayable"]
    assert budget.withdrawn == 0


async def test_non_replayable_body_error_is_raised_not_retried(clock: FakeClock) -> None:
    body = RequestBody(None, rest=_stream([b"rest"]), prefix=b"prefix")
    script = Scripted(err(FailureMode.CONNECT_ERROR), response(200))
    strategy = RetryStrategy(RetryConfig(max_attempts=3))
    with pytest.raises(SidecarError) as info:
        await strategy(make_request(body), make_ctx(clock), script)
    assert info.value.mode == FailureMode.CONNECT_ERROR
    assert script.calls == 1


async def test_replayable_body_is_sent_again(clock: FakeClock) -> None:
    script = Scripted(response(503), response(200))
    await RetryStrategy(RetryConfig())(make_request(b'{"x": 1}'), make_ctx(clock), script)
    assert [r.body.data for r in script.requests] == [b'{"x": 1}', b'{"x": 1}']


async def test_no_retry_once_the_response_started(clock: FakeClock) -> None:
    async def started_then_cut(request: object, ctx: object) -> None:
        ctx.response_started = True  # type: ignore[attr-defined]
        raise err(FailureMode.STREAM_INTERRUPTED)

    script = Scripted(started_then_cut, response(200))
    strategy = RetryStrategy(RetryConfig(idempotent=True))
    with pytest.raises(SidecarError):
        await strategy(make_request(), make_ctx(clock), script)
    assert script.calls == 1


async def test_deadline_aware_skip_when_remaining_is_below_median_latency(
    clock: FakeClock,
) -> None:
    latency = LatencyTracker()
    for seconds in (0.4, 0.5, 0.6):
        latency.record(seconds)
    assert latency.median() == 0.5
    first = response(503)
    script = Scripted(first, response(200))
    budget = generous_budget(clock)
    ctx = make_ctx(clock, deadline=clock.monotonic() + 0.3)
    strategy = RetryStrategy(
        RetryConfig(backoff_base=0.001, backoff_max=0.001), budget=budget, latency=latency
    )
    result = await strategy(make_request(), ctx, script)
    assert result is first
    assert script.calls == 1
    assert ctx.extra.get("retry_skipped_deadline") is True
    (skipped,) = [e for e in ctx.events if e.name == "retry_skipped"]
    assert skipped.attrs["reason"] == "deadline"
    assert skipped.attrs["remaining"] == pytest.approx(0.3)
    assert skipped.attrs["needed"] >= 0.5
    assert budget.withdrawn == 0


async def test_retries_when_the_deadline_leaves_room(clock: FakeClock) -> None:
    latency = LatencyTracker()
    latency.record(0.5)
    script = Scripted(response(503), response(200))
    ctx = make_ctx(clock, deadline=clock.monotonic() + 5.0)
    strategy = RetryStrategy(RetryConfig(), latency=latency)
    result = await strategy(make_request(), ctx, script)
    assert result.status == 200
    assert script.calls == 2
    assert "retry_skipped_deadline" not in ctx.extra


async def test_no_retry_when_the_deadline_already_passed(clock: FakeClock) -> None:
    script = Scripted(err(FailureMode.CONNECT_ERROR), response(200))
    ctx = make_ctx(clock, deadline=clock.monotonic() + 1.0)
    clock.advance(2.0)
    with pytest.raises(SidecarError):
        await RetryStrategy(RetryConfig())(make_request(), ctx, script)
    assert script.calls == 1
    assert [e.attrs.get("reason") for e in ctx.events] == ["deadline"]


async def test_latency_of_successful_attempts_is_recorded(clock: FakeClock) -> None:
    latency = LatencyTracker()
    script = Scripted(response(503), response(200), latency=0.25)
    await RetryStrategy(RetryConfig(), latency=latency)(make_request(), make_ctx(clock), script)
    # Only the successful attempt feeds the tracker; the 503 does not.
    assert latency.median() == pytest.approx(0.25)
    assert latency.quantile(0.0) == pytest.approx(0.25)


# -- budget ------------------------------------------------------------------------------------


async def test_every_request_deposits_once(clock: FakeClock) -> None:
    budget = generous_budget(clock)
    strategy = RetryStrategy(RetryConfig(), budget=budget)
    for _ in range(4):
        await strategy(make_request(), make_ctx(clock), Scripted(response(503), response(200)))
    assert budget.deposited == 4
    assert budget.withdrawn == 4


async def test_last_attempt_never_spends_a_token(clock: FakeClock) -> None:
    budget = generous_budget(clock)
    script = Scripted(*[response(503) for _ in range(3)])
    strategy = RetryStrategy(RetryConfig(max_attempts=3), budget=budget)
    await strategy(make_request(), make_ctx(clock), script)
    assert script.calls == 3
    assert budget.withdrawn == 2
    assert budget.refused == 0


async def test_single_attempt_never_touches_the_budget(clock: FakeClock) -> None:
    budget = RetryBudget(RetryBudgetConfig(ratio=0.0, min_per_second=0.0), clock)
    ctx = make_ctx(clock)
    strategy = RetryStrategy(RetryConfig(max_attempts=1), budget=budget)
    await strategy(make_request(), ctx, Scripted(response(503)))
    assert budget.withdrawn == 0
    assert budget.refused == 0
    assert ctx.budget_refused is False


async def test_budget_refusal_stops_retrying_and_is_recorded(clock: FakeClock) -> None:
    budget = RetryBudget(RetryBudgetConfig(ratio=0.0, min_per_second=0.0), clock)
    first = response(503)
    script = Scripted(first, response(200))
    ctx = make_ctx(clock)
    strategy = RetryStrategy(RetryConfig(max_attempts=3), budget=budget)
    result = await strategy(make_request(), ctx, script)
    assert result is first
    assert script.calls == 1
    assert ctx.budget_refused is True
    assert ctx.retries == 0
    assert ctx.failure_mode == FailureMode.UPSTREAM_5XX
    assert budget.refused == 1
    assert budget.withdrawn == 0
    (refused,) = [e for e in ctx.events if e.name == "budget_refused"]
    assert refused.attrs == {"attempt": 1, "mode": "upstream_5xx"}


async def test_budget_refusal_of_an_error_reraises_the_error(clock: FakeClock) -> None:
    budget = RetryBudget(RetryBudgetConfig(ratio=0.0, min_per_second=0.0), clock)
    script = Scripted(err(FailureMode.CONNECT_ERROR), response(200))
    ctx = make_ctx(clock)
    strategy = RetryStrategy(RetryConfig(), budget=budget)
    with pytest.raises(SidecarError) as info:
        await strategy(make_request(), ctx, script)
    assert info.value.mode == FailureMode.CONNECT_ERROR
    assert ctx.budget_refused is True
    assert "budget_refused" in names(ctx.events)


async def test_budget_allows_one_retry_then_refuses(clock: FakeClock) -> None:
    # ratio 0.5 and two deposits (this request and one before it) pay for exactly one retry.
    budget = RetryBudget(RetryBudgetConfig(ratio=0.5, min_per_second=0.0), clock)
    budget.deposit()
    script = Scripted(response(503), response(503), response(200))
    ctx = make_ctx(clock)
    strategy = RetryStrategy(RetryConfig(max_attempts=3), budget=budget)
    result = await strategy(make_request(), ctx, script)
    assert result.status == 503
    assert script.calls == 2
    assert ctx.retries == 1
    assert budget.withdrawn == 1
    assert budget.refused == 1
    assert names(ctx.events) == ["retry", "budget_refused"]
    assert ctx.events[1].attrs["attempt"] == 2


async def test_retries_over_a_run_stay_within_the_budget_bound() -> None:
    clock = FakeClock()
    config = RetryBudgetConfig(ratio=0.1, min_per_second=2.0, ttl=10.0)
    budget = RetryBudget(config, clock)
    strategy = RetryStrategy(
        RetryConfig(max_attempts=3, backoff_base=0.001, backoff_max=0.001), budget=budget
    )
    started = clock.monotonic()
    requests = retries = 0
    for _ in range(600):
        clock.advance(0.05)
        ctx = make_ctx(clock)
        await strategy(make_request(), ctx, Scripted(*[response(503)] * 3))
        requests += 1
        retries += ctx.retries
    elapsed = clock.monotonic() - started
    # ratio x requests, plus min_per_second over the run and the one second's reserve a new
    # budget starts with.
    bound = config.ratio * requests + config.min_per_second * (elapsed + 1.0)
    assert retries <= bound
    assert retries == budget.withdrawn
    # And the budget is really used, not just refused: close to the bound.
    assert retries >= 0.8 * bound


class _MaxRandom(random.Random):
    """Always picks the top of the range."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_closed_bodies_only_for_failed_responses(clock: FakeClock) -> None:
    ok = response(200)
    script = Scripted(response(503), ok)
    await RetryStrategy(RetryConfig())(make_request(), make_ctx(clock), script)
    assert isinstance(ok.body, ClosableBytesBody)
    assert ok.body.closed is False
    assert script.returned[0].body.closed is True  # type: ignore[attr-defined]
