"""TimeoutStrategy: `attempt_timeout`, `first_byte_timeout`, and `deadline_exceeded` when the
request's deadline is the binding limit.

asyncio.timeout runs on the loop's clock, so the hanging cases use an Event that is never set
and a tiny limit (deterministic: the only way out is the timeout); the passing cases return at
once under a large limit. The FakeClock only drives `ctx.remaining()` and `first_byte_seconds`.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.clock import FakeClock
from sidecar.errors import FailureMode, SidecarError
from sidecar.pipeline import BytesBody
from sidecar.strategies.timeout import TimeoutConfig, TimeoutStrategy
from tests.unit.strategies.scripted import (
    Scripted,
    StreamingBody,
    hang,
    make_ctx,
    make_request,
    response,
)

TINY = 0.001
LARGE = 60.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- headers -----------------------------------------------------------------------------------


async def test_fast_answer_passes_under_a_large_timeout(clock: FakeClock) -> None:
    ok = response(200)
    ctx = make_ctx(clock)
    result = await TimeoutStrategy(TimeoutConfig(attempt=LARGE))(make_request(), ctx, Scripted(ok))
    assert result is ok
    assert ctx.events == []


async def test_hung_upstream_is_an_attempt_timeout(clock: FakeClock) -> None:
    ctx = make_ctx(clock)
    with pytest.raises(SidecarError) as info:
        await TimeoutStrategy(TimeoutConfig(attempt=TINY))(make_request(), ctx, Scripted(hang()))
    assert info.value.mode == FailureMode.ATTEMPT_TIMEOUT
    (event,) = ctx.events
    assert event.name == "attempt_timeout"
    assert event.attrs == {"timeout": TINY, "phase": "headers"}


async def test_attempt_timeout_when_the_deadline_is_far(clock: FakeClock) -> None:
    ctx = make_ctx(clock, deadline=clock.monotonic() + LARGE)
    with pytest.raises(SidecarError) as info:
        await TimeoutStrategy(TimeoutConfig(attempt=TINY))(make_request(), ctx, Scripted(hang()))
    assert info.value.mode == FailureMode.ATTEMPT_TIMEOUT


async def test_deadline_exceeded_when_the_deadline_is_binding(clock: FakeClock) -> None:
    ctx = make_ctx(clock, deadline=clock.monotonic() + TINY)
    with pytest.raises(SidecarError) as info:
        await TimeoutStrategy(TimeoutConfig(attempt=LARGE))(make_request(), ctx, Scripted(hang()))
    assert info.value.mode == FailureMode.DEADLINE_EXCEEDED
    assert [(e.name, e.attrs["phase"]) for e in ctx.events] == [("deadline_exceeded", "headers")]


async def test_passed_deadline_fails_without_calling_upstream(clock: FakeClock) -> None:
    ctx = make_ctx(clock, deadline=clock.monotonic() + 1.0)
    clock.advance(1.5)
    script = Scripted(response(200))
    with pytest.raises(SidecarError) as info:
        await TimeoutStrategy(TimeoutConfig(attempt=LARGE))(make_request(), ctx, script)
    assert info.value.mode == FailureMode.DEADLINE_EXCEEDED
    assert script.calls == 0


async def test_a_timeout_raised_by_the_upstream_itself_is_not_relabelled(clock: FakeClock) -> None:
    # Only our own scope's expiry is an attempt timeout; anything else propagates as it is.
    with pytest.raises(TimeoutError):
        await TimeoutStrategy(TimeoutConfig(attempt=LARGE))(
            make_request(), make_ctx(clock), Scripted(TimeoutError("inner"))
        )


async def test_upstream_errors_pass_through(clock: FakeClock) -> None:
    error = SidecarError(FailureMode.CONNECT_ERROR, "refused")
    with pytest.raises(SidecarError) as info:
        await TimeoutStrategy(TimeoutConfig(attempt=LARGE))(
            make_request(), make_ctx(clock), Scripted(error)
        )
    assert info.value is error


async def test_remaining_deadline_is_sent_upstream(clock: FakeClock) -> None:
    ctx = make_ctx(clock, deadline=clock.monotonic() + 1.25)
    script = Scripted(response(200))
    request = make_request(headers=[("X-Request-Timeout", "30"), ("accept", "*/*")])
    await TimeoutStrategy(TimeoutConfig(attempt=LARGE))(request, ctx, script)
    sent = script.requests[0].headers
    assert [v for k, v in sent if k.lower() == "x-request-timeout"] == ["1.250"]
    assert ("accept", "*/*") in sent
    # The caller's request object is left as it was (a retry starts from it again).
    assert ("X-Request-Timeout", "30") in request.headers


async def test_no_deadline_header_without_a_deadline(clock: FakeClock) -> None:
    script = Scripted(response(200))
    await TimeoutStrategy(TimeoutConfig(attempt=LARGE))(make_request(), make_ctx(clock), script)
    assert all(k.lower() != "x-request-timeout" for k, _ in script.requests[0].headers)


# -- first byte --------------------------------------------------------------------------------


async def test_hung_first_byte_is_a_first_byte_timeout(clock: FakeClock) -> None:
    body = StreamingBody([b"never"], gate=asyncio.Event())
    ctx = make_ctx(clock)
    strategy = TimeoutStrategy(TimeoutConfig(attempt=LARGE, first_byte=TINY))
    with pytest.raises(SidecarError) as info:
        await strategy(make_request(), ctx, Scripted(response(200, body)))
    assert info.value.mode == FailureMode.FIRST_BYTE_TIMEOUT
    assert body.closed
    assert [(e.name, e.attrs["phase"]) for e in ctx.events] == [("attempt_timeout", "first_byte")]
    assert ctx.first_byte_seconds is None


async def test_hung_first_byte_with_binding_deadline_is_deadline_exceeded(
    clock: FakeClock,
) -> None:
    body = StreamingBody([b"never"], gate=asyncio.Event())
    ctx = make_ctx(clock, deadline=clock.monotonic() + TINY)
    strategy = TimeoutStrategy(TimeoutConfig(attempt=LARGE, first_byte=LARGE))
    with pytest.raises(SidecarError) as info:
        await strategy(make_request(), ctx, Scripted(response(200, body)))
    assert info.value.mode == FailureMode.DEADLINE_EXCEEDED
    assert body.closed
    assert [(e.name, e.attrs["phase"]) for e in ctx.events] == [("deadline_exceeded", "first_byte")]


async def test_first_byte_in_time_is_measured_on_the_injected_clock(clock: FakeClock) -> None:
    body = StreamingBody([b"hello", b" world"], clock=clock, prefetch_delay=0.25)
    ctx = make_ctx(clock)
    strategy = TimeoutStrategy(TimeoutConfig(attempt=LARGE, first_byte=LARGE))
    result = await strategy(make_request(), ctx, Scripted(response(200, body)))
    assert result.body is body
    assert body.prefetched
    assert not body.closed
    assert ctx.first_byte_seconds == pytest.approx(0.25)
    assert await body.read_chunk() == b"hello"


async def test_error_while_prefetching_closes_the_body(clock: FakeClock) -> None:
    error = SidecarError(FailureMode.STREAM_INTERRUPTED, "reset")
    body = StreamingBody([b"x"], prefetch_error=error)
    strategy = TimeoutStrategy(TimeoutConfig(attempt=LARGE, first_byte=LARGE))
    with pytest.raises(SidecarError) as info:
        await strategy(make_request(), make_ctx(clock), Scripted(response(200, body)))
    assert info.value is error
    assert body.closed


async def test_no_first_byte_limit_means_no_prefetch(clock: FakeClock) -> None:
    body = StreamingBody([b"x"], gate=asyncio.Event())
    strategy = TimeoutStrategy(TimeoutConfig(attempt=LARGE, first_byte=None))
    result = await strategy(make_request(), make_ctx(clock), Scripted(response(200, body)))
    assert result.body is body
    assert not body.prefetched


async def test_in_memory_body_needs_no_prefetch(clock: FakeClock) -> None:
    ok = response(200, BytesBody(b"{}"))
    strategy = TimeoutStrategy(TimeoutConfig(attempt=LARGE, first_byte=TINY))
    assert await strategy(make_request(), make_ctx(clock), Scripted(ok)) is ok
