"""HedgeStrategy: when a hedge is sent, which answer wins, what happens to the losers, and what
the retry budget allows. Time is a fake clock whose hedge timers fire only when the test says."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sidecar.clock import FakeClock
from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.pipeline import ProxyRequest, ProxyResponse, RequestBody, compose
from sidecar.strategies.breaker import BreakerConfig, BreakerStrategy, CircuitBreaker, State
from sidecar.strategies.budget import RetryBudget, RetryBudgetConfig
from sidecar.strategies.hedge import HEDGE_LOST, HedgeConfig, HedgeStrategy
from sidecar.strategies.latency import LatencyTracker
from tests.unit.strategies.scripted import (
    ClosableBytesBody,
    Scripted,
    make_ctx,
    make_request,
    response,
)


class TimerClock(FakeClock):
    """A fake clock whose sleeps (the hedge timers) end only when the test fires them."""

    def __init__(self) -> None:
        super().__init__()
        self.timers: list[tuple[float, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        timer = asyncio.get_running_loop().create_future()
        self.timers.append((seconds, timer))
        await timer

    def pending(self) -> int:
        return sum(1 for _, t in self.timers if not t.done())

    async def fire(self) -> None:
        """End the oldest running timer (advancing the clock) and let the strategy react."""
        seconds, timer = next((s, t) for s, t in self.timers if not t.done())
        self.advance(seconds)
        timer.set_result(None)
        await settle()


class Held:
    """A transport step that waits for `release()`, then answers (or raises) `result`."""

    def __init__(self, result: ProxyResponse | BaseException) -> None:
        self.gate = asyncio.Event()
        self.result = result
        self.started = False
        self.cancelled_with: tuple[Any, ...] | None = None

    def release(self) -> None:
        self.gate.set()

    async def __call__(self, request: ProxyRequest, ctx: RequestContext) -> ProxyResponse:
        self.started = True
        try:
            await self.gate.wait()
        except asyncio.CancelledError as exc:
            self.cancelled_with = exc.args
            raise
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def names(ctx: RequestContext) -> list[str]:
    return [e.name for e in ctx.events]


def budget(clock: FakeClock, ratio: float = 100.0, min_per_second: float = 0.0) -> RetryBudget:
    b = RetryBudget(RetryBudgetConfig(ratio=ratio, min_per_second=min_per_second), clock)
    b.deposit()
    return b


def ok(data: bytes = b'{"ok":true}') -> ProxyResponse:
    return response(200, data)


async def test_an_answer_before_the_delay_sends_no_hedge() -> None:
    clock = TimerClock()
    script = Scripted(ok())
    ctx = make_ctx(clock)
    hedge = HedgeStrategy(HedgeConfig(delay=0.05), budget(clock))
    result = await hedge(make_request(), ctx, script)
    assert result.status == 200 and script.calls == 1 and ctx.attempts == 1
    assert names(ctx) == []
    assert clock.pending() == 0  # the hedge timer was cancelled


async def test_a_slow_attempt_is_hedged_after_the_delay_and_the_faster_hedge_wins() -> None:
    clock = TimerClock()
    slow = Held(ok(b"slow"))
    fast = ok(b"fast")
    script = Scripted(slow, fast)
    ctx = make_ctx(clock)
    b = budget(clock)
    task = asyncio.ensure_future(
        HedgeStrategy(HedgeConfig(delay=0.05), b)(make_request(), ctx, script)
    )
    await settle()
    assert script.calls == 1 and clock.sleeps == [0.05]
    await clock.fire()
    result = await task
    assert result is fast
    assert script.calls == 2 and ctx.attempts == 2  # the hedge is an attempt of its own
    assert slow.cancelled_with == (HEDGE_LOST,)  # the loser is cancelled, and says why
    assert names(ctx) == ["hedge", "hedge_won"]
    assert ctx.events[0].attrs == {"hedge": 1, "delay": 0.05}
    assert b.withdrawn == 1  # the hedge spent a retry-budget token
    assert ctx.upstream_status == 200


async def test_the_first_attempt_can_still_win_and_the_hedge_is_cancelled() -> None:
    clock = TimerClock()
    first = Held(ok(b"first"))
    second = Held(ok(b"second"))
    ctx = make_ctx(clock)
    task = asyncio.ensure_future(
        HedgeStrategy(HedgeConfig(delay=0.05), budget(clock))(
            make_request(), ctx, Scripted(first, second)
        )
    )
    await settle()
    await clock.fire()
    assert second.started
    first.release()
    result = await task
    assert result is first.result
    assert second.cancelled_with == (HEDGE_LOST,)
    assert names(ctx) == ["hedge"]  # no `hedge_won`: the hedge did not help this time


async def test_an_answer_that_lost_by_a_hair_has_its_body_closed() -> None:
    clock = TimerClock()
    first = Held(ok(b"first"))
    second = Held(ok(b"second"))
    ctx = make_ctx(clock)
    task = asyncio.ensure_future(
        HedgeStrategy(HedgeConfig(delay=0.05), budget(clock))(
            make_request(), ctx, Scripted(first, second)
        )
    )
    await settle()
    await clock.fire()
    first.release()
    second.release()  # both answer in the same loop turn
    result = await task
    assert result is first.result
    loser = second.result
    assert isinstance(loser, ProxyResponse) and isinstance(loser.body, ClosableBytesBody)
    assert loser.body.closed
    assert isinstance(result.body, ClosableBytesBody) and not result.body.closed


async def test_without_a_budget_token_there_is_no_hedge() -> None:
    clock = TimerClock()
    slow = Held(ok())
    ctx = make_ctx(clock)
    empty = RetryBudget(RetryBudgetConfig(ratio=0.0, min_per_second=0.0), clock)
    script = Scripted(slow)
    task = asyncio.ensure_future(
        HedgeStrategy(HedgeConfig(delay=0.05), empty)(make_request(), ctx, script)
    )
    await settle()
    await clock.fire()
    assert script.calls == 1 and clock.pending() == 0  # no hedge and no further timer
    assert names(ctx) == ["budget_refused", "hedge_skipped"]
    assert ctx.events[0].attrs == {"kind": "hedge"}
    assert ctx.events[1].attrs == {"reason": "budget"}
    assert ctx.budget_refused
    slow.release()
    assert (await task).status == 200


async def test_a_body_that_cannot_be_replayed_is_not_hedged() -> None:
    async def rest() -> AsyncIterator[bytes]:
        yield b"tail"

    clock = TimerClock()
    slow = Held(ok())
    ctx = make_ctx(clock)
    b = budget(clock)
    script = Scripted(slow)
    request = make_request(RequestBody(None, rest(), prefix=b"head"))
    task = asyncio.ensure_future(HedgeStrategy(HedgeConfig(delay=0.05), b)(request, ctx, script))
    await settle()
    await clock.fire()
    assert script.calls == 1 and b.withdrawn == 0
    assert names(ctx) == ["hedge_skipped"]
    assert ctx.events[0].attrs == {"reason": "body_not_replayable"}
    slow.release()
    assert (await task).status == 200


async def test_a_failure_before_the_delay_ends_the_round_without_a_hedge() -> None:
    clock = TimerClock()
    unavailable = response(503)
    ctx = make_ctx(clock)
    result = await HedgeStrategy(HedgeConfig(delay=0.05), budget(clock))(
        make_request(), ctx, Scripted(unavailable)
    )
    assert result is unavailable  # retry (outside) decides what to do with it
    assert isinstance(result.body, ClosableBytesBody) and not result.body.closed
    assert names(ctx) == [] and clock.pending() == 0


async def test_a_failed_attempt_waits_for_the_one_still_in_flight() -> None:
    clock = TimerClock()
    first = Held(ok(b"late but good"))
    failed = response(503)
    ctx = make_ctx(clock)
    task = asyncio.ensure_future(
        HedgeStrategy(HedgeConfig(delay=0.05), budget(clock))(
            make_request(), ctx, Scripted(first, failed)
        )
    )
    await settle()
    await clock.fire()
    assert not task.done()  # the hedge's 503 does not end the round
    first.release()
    assert await task is first.result
    assert isinstance(failed.body, ClosableBytesBody) and failed.body.closed


async def test_when_every_attempt_fails_the_last_failure_is_raised() -> None:
    clock = TimerClock()
    first = Held(SidecarError(FailureMode.ATTEMPT_TIMEOUT, "slow"))
    failed = response(502)
    ctx = make_ctx(clock)
    task = asyncio.ensure_future(
        HedgeStrategy(HedgeConfig(delay=0.05), budget(clock))(
            make_request(), ctx, Scripted(first, failed)
        )
    )
    await settle()
    await clock.fire()
    first.release()
    with pytest.raises(SidecarError) as info:
        await task
    assert info.value.mode == FailureMode.ATTEMPT_TIMEOUT
    assert isinstance(failed.body, ClosableBytesBody) and failed.body.closed


async def test_up_to_max_hedges_are_sent_one_delay_apart() -> None:
    clock = TimerClock()
    steps = [Held(ok(b"0")), Held(ok(b"1")), Held(ok(b"2"))]
    ctx = make_ctx(clock)
    script = Scripted(*steps)
    hedge = HedgeStrategy(HedgeConfig(delay=0.05, max_hedges=2), budget(clock))
    task = asyncio.ensure_future(hedge(make_request(), ctx, script))
    await settle()
    await clock.fire()
    await clock.fire()
    assert script.calls == 3 and clock.pending() == 0  # no third hedge
    steps[2].release()
    assert await task is steps[2].result
    assert steps[0].cancelled_with == steps[1].cancelled_with == (HEDGE_LOST,)
    assert names(ctx) == ["hedge", "hedge", "hedge_won"]
    assert ctx.events[-1].attrs == {"hedge": 2}


async def test_the_delay_can_follow_the_upstreams_recent_p95() -> None:
    clock = TimerClock()
    latency = LatencyTracker()
    hedge = HedgeStrategy(HedgeConfig(quantile=0.95), budget(clock), latency)
    assert hedge.delay() is None  # nothing seen yet: no hedging
    ctx = make_ctx(clock)
    assert (await hedge(make_request(), ctx, Scripted(ok()))).status == 200
    assert clock.sleeps == []
    for ms in range(1, 101):
        latency.record(ms / 1000)
    assert hedge.delay() == pytest.approx(0.095)
    slow = Held(ok())
    task = asyncio.ensure_future(hedge(make_request(), make_ctx(clock), Scripted(slow, ok())))
    await settle()
    assert clock.sleeps == [pytest.approx(0.095)]
    await clock.fire()
    assert (await task).status == 200


async def test_the_breaker_never_counts_the_cancelled_loser() -> None:
    clock = TimerClock()
    breaker = CircuitBreaker("model", BreakerConfig(consecutive_failures=1, min_calls=1), clock)
    slow = Held(ok())
    transport = Scripted(slow, ok())
    hedge = HedgeStrategy(HedgeConfig(delay=0.05), budget(clock))
    pipeline = compose([hedge, BreakerStrategy(breaker)], transport)
    ctx = make_ctx(clock)
    task = asyncio.ensure_future(pipeline(make_request(), ctx))
    await settle()
    await clock.fire()
    assert (await task).status == 200
    assert slow.cancelled_with == (HEDGE_LOST,)
    assert breaker.state == State.CLOSED
    assert breaker.window_counts() == (1, 0)  # the winner's success; the loser not at all


async def test_the_callers_cancellation_cancels_every_attempt() -> None:
    clock = TimerClock()
    first, second = Held(ok()), Held(ok())
    ctx = make_ctx(clock)
    task = asyncio.ensure_future(
        HedgeStrategy(HedgeConfig(delay=0.05), budget(clock))(
            make_request(), ctx, Scripted(first, second)
        )
    )
    await settle()
    await clock.fire()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Plainly cancelled, not as a lost race (telemetry names them by the caller's cancellation).
    assert first.cancelled_with == second.cancelled_with == ()
    assert clock.pending() == 0


async def test_no_hedge_while_the_breaker_only_admits_probes() -> None:
    clock = TimerClock()
    probe = Held(ok())
    ctx = make_ctx(clock)
    b = budget(clock)
    breaker = CircuitBreaker("model", BreakerConfig(open_for=1.0, jitter=0.0), clock)
    breaker.force("open")
    clock.advance(1.0)  # the next call is the half-open probe
    pipeline = compose(
        [HedgeStrategy(HedgeConfig(delay=0.05), b), BreakerStrategy(breaker)], Scripted(probe)
    )
    task = asyncio.ensure_future(pipeline(make_request(), ctx))
    await settle()
    assert ctx.breaker_state == State.HALF_OPEN
    await clock.fire()
    assert names(ctx)[-1] == "hedge_skipped" and ctx.events[-1].attrs == {
        "reason": "breaker_not_closed"
    }
    assert b.withdrawn == 0  # no token spent on a hedge the breaker would refuse
    probe.release()
    assert (await task).status == 200
    assert breaker.state == State.CLOSED
