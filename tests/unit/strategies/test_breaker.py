"""CircuitBreaker and BreakerStrategy: when the circuit opens, refuses, probes and recovers."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import pytest

from sidecar.clock import FakeClock
from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.strategies.breaker import (
    Admission,
    BreakerConfig,
    BreakerStrategy,
    CircuitBreaker,
    State,
)
from tests.unit.strategies.scripted import Scripted, hang, make_ctx, make_request, response


def breaker(
    clock: FakeClock,
    *,
    consecutive_failures: int = 3,
    failure_ratio: float = 0.5,
    min_calls: int = 1000,
    window: float = 30.0,
    open_for: float = 5.0,
    open_for_max: float = 60.0,
    jitter: float = 0.0,
    half_open_probes: int = 1,
    enabled: bool = True,
    rng: random.Random | None = None,
) -> CircuitBreaker:
    config = BreakerConfig(
        enabled=enabled,
        consecutive_failures=consecutive_failures,
        failure_ratio=failure_ratio,
        min_calls=min_calls,
        window=window,
        open_for=open_for,
        open_for_max=open_for_max,
        jitter=jitter,
        half_open_probes=half_open_probes,
    )
    return CircuitBreaker("model", config, clock, rng=rng)


def fail(cb: CircuitBreaker, times: int = 1, ctx: RequestContext | None = None) -> None:
    for _ in range(times):
        cb.record_failure(cb.admit(ctx), ctx)


def succeed(cb: CircuitBreaker, times: int = 1, ctx: RequestContext | None = None) -> None:
    for _ in range(times):
        cb.record_success(cb.admit(ctx), ctx)


def trip(cb: CircuitBreaker, ctx: RequestContext | None = None) -> None:
    fail(cb, cb.config.consecutive_failures, ctx)
    assert cb.state == State.OPEN


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- opening -----------------------------------------------------------------------------------


def test_opens_on_consecutive_failures(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=3)
    ctx = make_ctx(clock)
    fail(cb, 2, ctx)
    assert cb.state == State.CLOSED
    assert ctx.events == []
    fail(cb, 1, ctx)
    assert cb.state == State.OPEN
    (opened,) = ctx.events
    assert opened.name == "circuit_opened"
    assert opened.attrs["from"] == State.CLOSED
    assert opened.attrs["upstream"] == "model"
    assert opened.attrs["open_for"] == pytest.approx(5.0)
    assert cb.open_count == 1
    assert cb.transitions[State.OPEN] == 1


def test_a_success_resets_the_consecutive_counter(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=3)
    fail(cb, 2)
    succeed(cb)
    assert cb.snapshot()["consecutive_failures"] == 0
    fail(cb, 2)
    assert cb.state == State.CLOSED
    fail(cb)
    assert cb.state == State.OPEN


def test_opens_on_failure_ratio_once_min_calls_seen(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=100, failure_ratio=0.5, min_calls=10)
    for _ in range(4):
        succeed(cb)
        fail(cb)
    succeed(cb)
    assert cb.window_counts() == (9, 4)
    assert cb.state == State.CLOSED
    fail(cb)  # 10 calls, 5 failures: 0.5
    assert cb.window_counts() == (10, 5)
    assert cb.state == State.OPEN


def test_failure_ratio_is_not_applied_before_min_calls(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=100, failure_ratio=0.5, min_calls=10)
    fail(cb, 9)  # 100% failures, but only 9 calls
    assert cb.state == State.CLOSED
    fail(cb)
    assert cb.state == State.OPEN


def test_failure_ratio_below_threshold_stays_closed(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=100, failure_ratio=0.5, min_calls=10)
    for _ in range(10):
        succeed(cb, 2)
        fail(cb)
    assert cb.window_counts() == (30, 10)
    assert cb.state == State.CLOSED


def test_failures_older_than_the_window_do_not_count(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=100, failure_ratio=0.5, min_calls=10, window=30.0)
    fail(cb, 8)
    clock.advance(31.0)
    succeed(cb)
    fail(cb)
    assert cb.window_counts() == (2, 1)
    assert cb.state == State.CLOSED


# -- open --------------------------------------------------------------------------------------


def test_open_circuit_refuses_with_retry_after(clock: FakeClock) -> None:
    cb = breaker(clock, open_for=5.0)
    trip(cb)
    with pytest.raises(SidecarError) as info:
        cb.admit()
    assert info.value.mode == FailureMode.CIRCUIT_OPEN
    assert info.value.retry_after == pytest.approx(5.0)
    clock.advance(2.0)
    with pytest.raises(SidecarError) as info:
        cb.admit()
    assert info.value.retry_after == pytest.approx(3.0)


def test_calls_admitted_while_closed_that_end_while_open_are_ignored(clock: FakeClock) -> None:
    cb = breaker(clock)
    late = [cb.admit(), cb.admit()]
    trip(cb)
    until = cb.open_until
    cb.record_failure(late[0])
    cb.record_success(late[1])
    assert cb.state == State.OPEN
    assert cb.open_until == until
    assert cb.open_count == 1


# -- half-open ---------------------------------------------------------------------------------


def test_half_open_after_open_for_in_fake_time(clock: FakeClock) -> None:
    cb = breaker(clock, open_for=5.0)
    trip(cb)
    clock.advance(4.999)
    with pytest.raises(SidecarError):
        cb.admit()
    clock.advance(0.001)
    ctx = make_ctx(clock)
    assert cb.admit(ctx).probe is True
    assert cb.state == State.HALF_OPEN
    assert [e.name for e in ctx.events] == ["circuit_half_open"]
    assert cb.transitions[State.HALF_OPEN] == 1


@pytest.mark.parametrize("probes", [1, 2, 3])
def test_half_open_admits_exactly_the_configured_probes(clock: FakeClock, probes: int) -> None:
    cb = breaker(clock, open_for=5.0, half_open_probes=probes)
    trip(cb)
    clock.advance(5.0)
    admitted = [cb.admit() for _ in range(probes)]
    assert [a.probe for a in admitted] == [True] * probes
    assert cb.probes_in_flight == probes
    with pytest.raises(SidecarError) as info:
        cb.admit()
    assert info.value.mode == FailureMode.CIRCUIT_OPEN
    assert info.value.retry_after is not None and info.value.retry_after > 0
    # A finished probe frees its slot for another.
    cb.record_ignored(admitted[0])
    assert cb.admit().probe is True
    with pytest.raises(SidecarError):
        cb.admit()


def test_probe_success_closes_and_records_recovery_time(clock: FakeClock) -> None:
    cb = breaker(clock, open_for=5.0)
    trip(cb)
    clock.advance(7.5)
    ctx = make_ctx(clock)
    probe = cb.admit(ctx)
    clock.advance(0.5)
    cb.record_success(probe, ctx)
    assert cb.state == State.CLOSED
    assert cb.last_recovery_seconds == pytest.approx(8.0)
    closed = ctx.events[-1]
    assert closed.name == "circuit_closed"
    assert closed.attrs["recovery_seconds"] == pytest.approx(8.0)
    assert closed.attrs["from"] == State.HALF_OPEN
    assert cb.probes_in_flight == 0
    # Closed again: calls flow and the counters start afresh.
    assert cb.admit().probe is False
    assert cb.snapshot()["consecutive_failures"] == 0
    assert cb.window_counts() == (0, 0)


def test_recovery_time_spans_reopens(clock: FakeClock) -> None:
    cb = breaker(clock, open_for=1.0)
    trip(cb)
    clock.advance(1.0)
    cb.record_failure(cb.admit())  # reopen for 2s
    clock.advance(2.0)
    cb.record_success(cb.admit())
    assert cb.state == State.CLOSED
    assert cb.last_recovery_seconds == pytest.approx(3.0)


def test_probe_failure_reopens_with_doubled_duration_capped(clock: FakeClock) -> None:
    cb = breaker(clock, open_for=1.0, open_for_max=5.0)
    trip(cb)
    durations = [cb.open_until - clock.monotonic()]
    for _ in range(4):
        clock.advance(durations[-1])
        probe = cb.admit()
        assert probe.probe is True
        cb.record_failure(probe)
        assert cb.state == State.OPEN
        durations.append(cb.open_until - clock.monotonic())
    assert durations == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0])
    assert cb.open_count == 5


def test_open_duration_resets_after_recovery(clock: FakeClock) -> None:
    cb = breaker(clock, open_for=1.0)
    trip(cb)
    clock.advance(1.0)
    cb.record_failure(cb.admit())
    clock.advance(2.0)
    cb.record_success(cb.admit())
    trip(cb)
    assert cb.open_until - clock.monotonic() == pytest.approx(1.0)


def test_jitter_is_bounded_and_varies() -> None:
    seen = set()
    for seed in range(30):
        clock = FakeClock()
        cb = breaker(clock, open_for=2.0, open_for_max=6.0, jitter=0.1, rng=random.Random(seed))
        trip(cb)
        first = cb.open_until - clock.monotonic()
        assert 2.0 <= first <= 2.2
        clock.advance(first)
        cb.record_failure(cb.admit())
        second = cb.open_until - clock.monotonic()
        assert 4.0 <= second <= 4.4
        for _ in range(3):
            clock.advance(cb.open_until - clock.monotonic())
            cb.record_failure(cb.admit())
            capped = cb.open_until - clock.monotonic()
            assert 6.0 <= capped <= 6.6
        seen.add(round(first, 6))
    assert len(seen) > 20


def test_ignored_probe_leaves_the_circuit_half_open(clock: FakeClock) -> None:
    cb = breaker(clock)
    trip(cb)
    clock.advance(5.0)
    probe = cb.admit()
    cb.record_ignored(probe)
    assert cb.state == State.HALF_OPEN
    assert cb.probes_in_flight == 0
    assert cb.open_count == 1


def test_ignored_call_never_counts(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=2, min_calls=1)
    for _ in range(10):
        cb.record_ignored(cb.admit())
    assert cb.state == State.CLOSED
    assert cb.window_counts() == (0, 0)
    assert cb.snapshot()["consecutive_failures"] == 0


# -- stale outcomes: an outcome moves the state only in the period that admitted its call ------


def reopen(cb: CircuitBreaker, how: str, clock: FakeClock) -> None:
    """End the current half-open period without its probe's outcome."""
    if how == "operator":
        cb.force("open")
    elif how == "replica":
        assert cb.adopt_open(clock.monotonic() + 3.0)
    else:  # another probe of the same period failed
        cb.record_failure(cb.admit())
    assert cb.state == State.OPEN


def half_open_again(cb: CircuitBreaker, clock: FakeClock) -> Admission:
    clock.advance(cb.open_until - clock.monotonic())
    probe = cb.admit()
    assert probe.probe and cb.state == State.HALF_OPEN
    return probe


REOPENED_BY = ["operator", "replica", "probe"]


def stale_and_current_probe(
    clock: FakeClock, how: str
) -> tuple[CircuitBreaker, Admission, Admission]:
    """A probe admitted in one half-open period, then the circuit reopened (`how`) and
    half-opened again with a probe of its own."""
    cb = breaker(clock, half_open_probes=2 if how == "probe" else 1)
    trip(cb)
    clock.advance(5.0)
    stale = cb.admit()
    reopen(cb, how, clock)
    return cb, stale, half_open_again(cb, clock)


@pytest.mark.parametrize("how", REOPENED_BY)
def test_a_stale_probe_success_does_not_close_the_next_half_open_period(
    clock: FakeClock, how: str
) -> None:
    cb, stale, current = stale_and_current_probe(clock, how)
    if how == "probe":
        cb.admit()  # fill the second slot too
    held = cb.probes_in_flight
    cb.record_success(stale)
    assert cb.state == State.HALF_OPEN
    assert cb.probes_in_flight == held  # the stale probe held no slot of this period
    with pytest.raises(SidecarError):
        cb.admit()
    cb.record_success(current)  # this period's probe decides
    assert cb.state == State.CLOSED


@pytest.mark.parametrize("how", REOPENED_BY)
def test_a_stale_probe_failure_does_not_reopen_the_next_half_open_period(
    clock: FakeClock, how: str
) -> None:
    cb, stale, current = stale_and_current_probe(clock, how)
    opens = cb.open_count
    cb.record_failure(stale)
    assert cb.state == State.HALF_OPEN and cb.open_count == opens
    cb.record_failure(current)
    assert cb.state == State.OPEN and cb.open_count == opens + 1


def test_a_stale_probe_released_does_not_free_the_new_periods_slot(clock: FakeClock) -> None:
    cb = breaker(clock, half_open_probes=1)
    trip(cb)
    clock.advance(5.0)
    stale = cb.admit()
    cb.force("open")
    current = half_open_again(cb, clock)
    cb.record_ignored(stale)
    assert cb.probes_in_flight == 1
    with pytest.raises(SidecarError) as info:
        cb.admit()
    assert info.value.mode == FailureMode.CIRCUIT_OPEN
    cb.record_ignored(current)  # the current probe does free it
    assert cb.probes_in_flight == 0
    assert cb.admit().probe is True


def test_stale_failures_do_not_reopen_a_freshly_closed_circuit(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=1, min_calls=1)
    admitted_closed = cb.admit()
    trip(cb)
    clock.advance(5.0)
    stale_probe = cb.admit()
    cb.force("open")
    cb.record_success(half_open_again(cb, clock))
    assert cb.state == State.CLOSED
    cb.record_failure(stale_probe)
    cb.record_failure(admitted_closed)  # from the closed period before the first open
    assert cb.state == State.CLOSED
    assert cb.snapshot()["consecutive_failures"] == 0
    assert cb.window_counts() == (0, 0)
    fail(cb)  # a call of this closed period still trips it
    assert cb.state == State.OPEN


def test_calls_of_an_earlier_closed_period_do_not_count_in_a_later_one(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=3, failure_ratio=0.5, min_calls=4)
    earlier = [cb.admit() for _ in range(4)]
    trip(cb)
    clock.advance(5.0)
    succeed(cb)  # the probe closes: a new closed period
    assert cb.state == State.CLOSED
    fail(cb, 2)
    cb.record_success(earlier[0])  # would reset the consecutive counter
    for late in earlier[1:]:
        cb.record_failure(late)  # would trip on count and on ratio
    assert cb.state == State.CLOSED
    assert cb.snapshot()["consecutive_failures"] == 2
    assert cb.window_counts() == (2, 2)
    fail(cb)
    assert cb.state == State.OPEN


def test_calls_admitted_together_in_one_closed_period_all_count(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=3)
    in_flight = [cb.admit() for _ in range(3)]
    cb.record_success(cb.admit())  # others finish in between; still the same period
    for admission in in_flight[:2]:
        cb.record_failure(admission)
    assert cb.state == State.CLOSED
    cb.record_failure(in_flight[2])
    assert cb.state == State.OPEN
    assert cb.window_counts() == (4, 3)


def test_a_forced_reset_starts_a_new_closed_period(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=2)
    before = cb.admit()
    fail(cb)
    cb.force("reset")
    fail(cb)
    cb.record_failure(before)  # counted against the counters the operator cleared
    assert cb.state == State.CLOSED
    assert cb.snapshot()["consecutive_failures"] == 1


# -- operator actions and snapshot -------------------------------------------------------------


def test_force_open_close_reset(clock: FakeClock) -> None:
    cb = breaker(clock, open_for=5.0)
    cb.force("open")
    assert cb.state == State.OPEN
    with pytest.raises(SidecarError):
        cb.admit()
    clock.advance(1.0)
    cb.force("close")
    assert cb.state == State.CLOSED
    assert cb.admit().probe is False
    assert cb.last_recovery_seconds == pytest.approx(1.0)
    assert cb.open_count == 1
    cb.force("open")
    cb.force("reset")
    assert cb.state == State.CLOSED
    assert cb.open_count == 0
    assert cb.last_recovery_seconds is None
    with pytest.raises(ValueError, match="unknown breaker action"):
        cb.force("explode")


def test_force_close_clears_counters(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=3)
    fail(cb, 2)
    cb.force("open")
    cb.force("close")
    fail(cb, 2)
    assert cb.state == State.CLOSED


def test_snapshot_when_closed(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=5)
    succeed(cb)
    fail(cb, 2)
    snap = cb.snapshot()
    assert snap["upstream"] == "model"
    assert snap["state"] == State.CLOSED
    assert snap["enabled"] is True
    assert snap["consecutive_failures"] == 2
    assert snap["window_calls"] == 3
    assert snap["window_failures"] == 2
    assert snap["opened_at"] is None
    assert snap["next_probe_at"] is None
    assert snap["next_probe_in"] is None
    assert snap["probes_in_flight"] == 0
    assert snap["open_count"] == 0
    assert snap["last_recovery_seconds"] is None


def test_snapshot_when_open(clock: FakeClock) -> None:
    cb = breaker(clock, open_for=5.0)
    trip(cb)
    opened_wall = clock.wall()
    clock.advance(2.0)
    snap = cb.snapshot()
    assert snap["state"] == State.OPEN
    assert snap["opened_at"] == dt.datetime.fromtimestamp(opened_wall, tz=dt.UTC).isoformat()
    assert snap["next_probe_in"] == pytest.approx(3.0)
    expected_probe = dt.datetime.fromtimestamp(opened_wall + 5.0, tz=dt.UTC).isoformat()
    assert snap["next_probe_at"] == expected_probe
    assert snap["open_count"] == 1
    assert snap["transitions"] == {State.OPEN: 1, State.HALF_OPEN: 0, State.CLOSED: 0}


def test_listeners_see_every_transition(clock: FakeClock) -> None:
    cb = breaker(clock)
    seen: list[tuple[str, str]] = []
    cb.listeners.append(lambda b, old, new, ctx: seen.append((old, new)))
    trip(cb)
    clock.advance(5.0)
    cb.record_success(cb.admit())
    assert seen == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]


def test_disabled_breaker_never_refuses(clock: FakeClock) -> None:
    cb = breaker(clock, enabled=False, consecutive_failures=1, min_calls=1)
    for _ in range(50):
        admission = cb.admit()
        assert admission.probe is False
        cb.record_failure(admission)
    assert cb.state == State.CLOSED
    assert cb.open_count == 0
    assert cb.snapshot()["enabled"] is False


# -- BreakerStrategy ---------------------------------------------------------------------------


async def test_5xx_response_counts_and_tripping_call_returns_its_own_answer(
    clock: FakeClock,
) -> None:
    cb = breaker(clock, consecutive_failures=2)
    strategy = BreakerStrategy(cb)
    script = Scripted(response(500), response(502), response(200))
    first = await strategy(make_request(), make_ctx(clock), script)
    assert first.status == 500
    ctx = make_ctx(clock)
    second = await strategy(make_request(), ctx, script)
    assert second.status == 502  # the tripping call is not turned into circuit_open
    assert cb.state == State.OPEN
    assert ctx.breaker_state == State.OPEN
    assert "circuit_opened" in [e.name for e in ctx.events]
    with pytest.raises(SidecarError) as info:
        await strategy(make_request(), make_ctx(clock), script)
    assert info.value.mode == FailureMode.CIRCUIT_OPEN
    assert script.calls == 2  # refused without calling the upstream


async def test_429_counts_as_failure(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=2)
    strategy = BreakerStrategy(cb)
    script = Scripted(response(429), response(429))
    for _ in range(2):
        await strategy(make_request(), make_ctx(clock), script)
    assert cb.state == State.OPEN


async def test_tripping_error_surfaces_its_own_mode(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=1)
    ctx = make_ctx(clock)
    script = Scripted(SidecarError(FailureMode.ATTEMPT_TIMEOUT, "slow"))
    with pytest.raises(SidecarError) as info:
        await BreakerStrategy(cb)(make_request(), ctx, script)
    assert info.value.mode == FailureMode.ATTEMPT_TIMEOUT
    assert cb.state == State.OPEN
    assert ctx.breaker_state == State.OPEN


async def test_unexpected_exception_counts_as_failure(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=1)
    with pytest.raises(RuntimeError):
        await BreakerStrategy(cb)(make_request(), make_ctx(clock), Scripted(RuntimeError("x")))
    assert cb.state == State.OPEN


@pytest.mark.parametrize(
    "error",
    [
        SidecarError(FailureMode.CLIENT_ERROR, "bad request"),
        SidecarError(FailureMode.CLIENT_CANCELLED, "gone"),
        SidecarError(FailureMode.DEADLINE_EXCEEDED, "caller's deadline"),
        SidecarError(FailureMode.LOW_CONFIDENCE, "unsure"),
    ],
    ids=lambda e: e.mode.value,
)
async def test_non_availability_errors_never_count(clock: FakeClock, error: SidecarError) -> None:
    cb = breaker(clock, consecutive_failures=1, min_calls=1)
    strategy = BreakerStrategy(cb)
    for _ in range(5):
        with pytest.raises(SidecarError):
            await strategy(make_request(), make_ctx(clock), Scripted(error))
    assert cb.state == State.CLOSED
    assert cb.window_counts() == (0, 0)


async def test_client_errors_responses_do_not_count(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=1, min_calls=1)
    strategy = BreakerStrategy(cb)
    script = Scripted(response(400), response(404), response(413))
    for _ in range(3):
        await strategy(make_request(), make_ctx(clock), script)
    assert cb.state == State.CLOSED
    assert cb.window_counts() == (3, 0)


async def test_cancellation_never_counts(clock: FakeClock) -> None:
    cb = breaker(clock, consecutive_failures=1, min_calls=1)
    strategy = BreakerStrategy(cb)
    for _ in range(3):
        with pytest.raises(asyncio.CancelledError):
            await strategy(make_request(), make_ctx(clock), Scripted(asyncio.CancelledError()))
    assert cb.state == State.CLOSED
    assert cb.window_counts() == (0, 0)


async def test_cancelled_task_releases_its_probe(clock: FakeClock) -> None:
    cb = breaker(clock)
    trip(cb)
    clock.advance(5.0)
    strategy = BreakerStrategy(cb)
    task = asyncio.create_task(strategy(make_request(), make_ctx(clock), Scripted(hang())))
    await asyncio.sleep(0)
    assert cb.probes_in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cb.probes_in_flight == 0
    assert cb.state == State.HALF_OPEN
    assert cb.open_count == 1


async def test_concurrent_half_open_calls_admit_one_probe(clock: FakeClock) -> None:
    cb = breaker(clock, half_open_probes=1)
    trip(cb)
    clock.advance(5.0)
    strategy = BreakerStrategy(cb)
    gate = asyncio.Event()
    upstream = Scripted(hang(gate))
    probe_ctx = make_ctx(clock)
    probe = asyncio.create_task(strategy(make_request(), probe_ctx, upstream))
    await asyncio.sleep(0)
    assert probe_ctx.breaker_state == State.HALF_OPEN
    for _ in range(3):
        with pytest.raises(SidecarError) as info:
            await strategy(make_request(), make_ctx(clock), upstream)
        assert info.value.mode == FailureMode.CIRCUIT_OPEN
    assert upstream.calls == 1
    gate.set()
    answer = await probe
    assert answer.status == 200
    assert cb.state == State.CLOSED
    assert probe_ctx.breaker_state == State.CLOSED


async def test_probe_failure_through_strategy_reopens(clock: FakeClock) -> None:
    cb = breaker(clock, open_for=1.0)
    trip(cb)
    clock.advance(1.0)
    ctx = make_ctx(clock)
    answer = await BreakerStrategy(cb)(make_request(), ctx, Scripted(response(503)))
    assert answer.status == 503
    assert cb.state == State.OPEN
    assert cb.open_until - clock.monotonic() == pytest.approx(2.0)
    assert [e.name for e in ctx.events] == ["circuit_half_open", "circuit_opened"]


async def test_disabled_breaker_strategy_always_calls_upstream(clock: FakeClock) -> None:
    cb = breaker(clock, enabled=False, consecutive_failures=1)
    strategy = BreakerStrategy(cb)
    script = Scripted(*[response(500) for _ in range(5)])
    for _ in range(5):
        assert (await strategy(make_request(), make_ctx(clock), script)).status == 500
    assert script.calls == 5


async def test_a_probe_outliving_its_period_answers_its_caller_but_does_not_decide(
    clock: FakeClock,
) -> None:
    cb = breaker(clock)
    trip(cb)
    clock.advance(5.0)
    strategy = BreakerStrategy(cb)
    stale_gate, current_gate = asyncio.Event(), asyncio.Event()

    async def still_failing(request: object, ctx: RequestContext) -> object:
        await current_gate.wait()
        return response(503)

    upstream = Scripted(hang(stale_gate), still_failing)
    stale_ctx, current_ctx = make_ctx(clock), make_ctx(clock)
    stale = asyncio.create_task(strategy(make_request(), stale_ctx, upstream))
    await asyncio.sleep(0)
    assert cb.probes_in_flight == 1
    cb.force("open")  # an operator reopens while the probe is out
    clock.advance(cb.open_until - clock.monotonic())
    current = asyncio.create_task(strategy(make_request(), current_ctx, upstream))
    await asyncio.sleep(0)
    assert upstream.calls == 2 and cb.state == State.HALF_OPEN
    stale_gate.set()
    assert (await stale).status == 200  # its caller still gets the answer
    assert cb.state == State.HALF_OPEN and cb.probes_in_flight == 1
    assert stale_ctx.breaker_state == State.HALF_OPEN
    assert "circuit_closed" not in [e.name for e in stale_ctx.events]
    current_gate.set()
    assert (await current).status == 503
    assert cb.state == State.OPEN
    assert current_ctx.breaker_state == State.OPEN
