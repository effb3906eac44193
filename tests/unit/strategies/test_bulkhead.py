"""Bulkhead and BulkheadStrategy: slots, the bounded queue, shedding and the adaptive limit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sidecar.clock import FakeClock
from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.pipeline import ProxyRequest, ProxyResponse
from sidecar.strategies.bulkhead import Bulkhead, BulkheadConfig, BulkheadStrategy
from tests.unit.strategies.scripted import (
    Scripted,
    StreamingBody,
    make_ctx,
    make_request,
    response,
)


class TimerClock(FakeClock):
    """A fake clock whose sleeps (the queue timeout) end only when the test fires them."""

    def __init__(self) -> None:
        super().__init__()
        self.fire = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await self.fire.wait()
        self.advance(seconds)


def bulkhead(clock: FakeClock, **config: Any) -> Bulkhead:
    return Bulkhead("model", BulkheadConfig(**config), clock)


def held(gate: asyncio.Event) -> Callable[[ProxyRequest, RequestContext], Awaitable[Any]]:
    async def step(request: ProxyRequest, ctx: RequestContext) -> ProxyResponse:
        await gate.wait()
        return response(200, b'{"ok":true}')

    return step


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def drain(resp: ProxyResponse) -> bytes:
    out = b""
    while chunk := await resp.body.read_chunk():
        out += chunk
    return out


async def test_admits_up_to_the_limit_and_sheds_the_rest_with_retry_after() -> None:
    clock = FakeClock()
    bh = bulkhead(clock, max_in_flight=2, queue=0, retry_after=3.0)
    strategy = BulkheadStrategy(bh)
    gate = asyncio.Event()
    transport = Scripted(held(gate), held(gate))
    running = [
        asyncio.create_task(strategy(make_request(), make_ctx(clock), transport)) for _ in range(2)
    ]
    await settle()
    assert bh.in_flight == 2
    ctx = make_ctx(clock)
    with pytest.raises(SidecarError) as info:
        await strategy(make_request(), ctx, transport)
    assert info.value.mode == FailureMode.OVERLOADED
    assert info.value.retry_after == 3.0
    (shed,) = [e for e in ctx.events if e.name == "shed"]
    assert shed.attrs == {
        "upstream": "model",
        "reason": "limit",
        "in_flight": 2,
        "limit": 2,
        "queued": 0,
    }
    assert transport.calls == 2  # the shed request never reached the upstream
    gate.set()
    for resp in await asyncio.gather(*running):
        assert await drain(resp) == b'{"ok":true}'
    assert bh.in_flight == 0
    assert bh.shed_count == 1


async def test_a_queued_request_gets_the_slot_a_finished_one_frees() -> None:
    clock = TimerClock()
    bh = bulkhead(clock, max_in_flight=1, queue=1, queue_timeout=0.1)
    strategy = BulkheadStrategy(bh)
    first_gate = asyncio.Event()
    transport = Scripted(held(first_gate), response(200, b"second"))
    first = asyncio.create_task(strategy(make_request(), make_ctx(clock), transport))
    await settle()
    second = asyncio.create_task(strategy(make_request(), make_ctx(clock), transport))
    await settle()
    assert bh.queued == 1 and transport.calls == 1
    first_gate.set()
    # The slot is held until the first answer's body is read to its end.
    first_response = await first
    await settle()
    assert not second.done()
    await drain(first_response)
    second_response = await second
    assert await drain(second_response) == b"second"
    assert bh.in_flight == 0 and bh.shed_count == 0


async def test_full_queue_sheds_at_once_and_expired_wait_sheds() -> None:
    clock = TimerClock()
    bh = bulkhead(clock, max_in_flight=1, queue=1, queue_timeout=0.25)
    strategy = BulkheadStrategy(bh)
    gate = asyncio.Event()
    transport = Scripted(held(gate))
    holder = asyncio.create_task(strategy(make_request(), make_ctx(clock), transport))
    await settle()
    waiting_ctx = make_ctx(clock)
    waiting = asyncio.create_task(strategy(make_request(), waiting_ctx, transport))
    await settle()
    full_ctx = make_ctx(clock)
    with pytest.raises(SidecarError) as info:
        await strategy(make_request(), full_ctx, transport)
    assert info.value.mode == FailureMode.OVERLOADED
    assert [e.attrs["reason"] for e in full_ctx.events] == ["queue_full"]
    clock.fire.set()  # the queue timeout runs out
    with pytest.raises(SidecarError) as info:
        await waiting
    assert info.value.mode == FailureMode.OVERLOADED
    assert [e.attrs["reason"] for e in waiting_ctx.events] == ["queue_timeout"]
    assert clock.sleeps == [0.25]
    assert bh.queued == 0 and bh.in_flight == 1
    gate.set()
    await drain(await holder)
    assert bh.in_flight == 0


async def test_slot_is_freed_on_error_close_and_request_end() -> None:
    clock = FakeClock()
    bh = bulkhead(clock, max_in_flight=1, queue=0)
    strategy = BulkheadStrategy(bh)
    err = SidecarError(FailureMode.CONNECT_ERROR, "refused")
    transport = Scripted(err, response(200, b"x"), response(200, StreamingBody([b"a", b"b"])))
    with pytest.raises(SidecarError):
        await strategy(make_request(), make_ctx(clock), transport)
    assert bh.in_flight == 0
    resp = await strategy(make_request(), make_ctx(clock), transport)
    assert bh.in_flight == 1
    resp.body.close()
    assert bh.in_flight == 0
    ctx = make_ctx(clock)
    resp = await strategy(make_request(), ctx, transport)
    assert await resp.body.read_chunk() == b"a"  # half read, then the body is dropped
    assert bh.in_flight == 1
    ctx.finish()  # the server runs the finish hooks when the request is over
    assert bh.in_flight == 0
    resp.body.close()  # releasing twice never frees someone else's slot
    assert bh.in_flight == 0


async def test_read_all_passes_through_and_frees_the_slot() -> None:
    clock = FakeClock()
    bh = bulkhead(clock, max_in_flight=1, queue=0)
    transport = Scripted(response(200, StreamingBody([b"ab", b"cd"])))
    resp = await BulkheadStrategy(bh)(make_request(), make_ctx(clock), transport)
    read_all = resp.body.read_all  # type: ignore[attr-defined]
    assert await read_all(3) is None  # over the limit: nothing lost, still in flight
    assert bh.in_flight == 1
    assert await read_all(100) == b"abcd"
    assert bh.in_flight == 0


async def test_cancelled_while_queued_does_not_leak_a_slot() -> None:
    clock = TimerClock()
    bh = bulkhead(clock, max_in_flight=1, queue=2, queue_timeout=1.0)
    strategy = BulkheadStrategy(bh)
    gate = asyncio.Event()
    transport = Scripted(held(gate), response(200, b"later"))
    holder = asyncio.create_task(strategy(make_request(), make_ctx(clock), transport))
    await settle()
    leaver = asyncio.create_task(strategy(make_request(), make_ctx(clock), transport))
    await settle()
    leaver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaver
    assert bh.queued == 0
    gate.set()
    await drain(await holder)
    assert bh.in_flight == 0
    resp = await strategy(make_request(), make_ctx(clock), transport)
    assert await drain(resp) == b"later"
    assert bh.in_flight == 0


async def test_adaptive_limit_shrinks_on_slow_answers_and_grows_back() -> None:
    clock = FakeClock()
    bh = bulkhead(
        clock,
        max_in_flight=10,
        queue=0,
        adaptive=True,
        adaptive_latency=0.5,
        min_in_flight=2,
        backoff_ratio=0.5,
    )
    strategy = BulkheadStrategy(bh)
    slow = Scripted(*(response(200) for _ in range(5)), latency=1.0)
    for _ in range(5):
        await drain(await strategy(make_request(), make_ctx(clock), slow))
    assert bh.current_limit() == 2  # 10 → 5 → 2.5 → 2 (floor), never below min_in_flight
    fast = Scripted(*(response(200) for _ in range(200)), latency=0.01)
    for _ in range(200):
        await drain(await strategy(make_request(), make_ctx(clock), fast))
    assert bh.current_limit() == 10  # back up to max_in_flight, and no further
    timeouts = Scripted(SidecarError(FailureMode.ATTEMPT_TIMEOUT, "slow"))
    with pytest.raises(SidecarError):
        await strategy(make_request(), make_ctx(clock), timeouts)
    assert bh.current_limit() == 5
    rate_limited = Scripted(response(429))
    await drain(await strategy(make_request(), make_ctx(clock), rate_limited))
    assert bh.current_limit() == 2


async def test_fixed_limit_ignores_latency_and_reconfigure_keeps_in_flight() -> None:
    clock = FakeClock()
    bh = bulkhead(clock, max_in_flight=3, queue=0)
    strategy = BulkheadStrategy(bh)
    slow = Scripted(*(response(200) for _ in range(3)), latency=30.0)
    kept = [await strategy(make_request(), make_ctx(clock), slow) for _ in range(3)]
    assert bh.current_limit() == 3 and bh.in_flight == 3
    bh.reconfigure(BulkheadConfig(max_in_flight=5, queue=0))
    assert bh.in_flight == 3 and bh.current_limit() == 5
    for resp in kept:
        await drain(resp)
    assert bh.in_flight == 0
    assert bh.snapshot()["limit"] == 5
