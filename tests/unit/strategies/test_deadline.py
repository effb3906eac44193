"""DeadlineStrategy and caller_timeout: one budget for the whole request, which a caller may
shorten (`x-request-timeout`, `grpc-timeout`) but never lengthen."""

from __future__ import annotations

import pytest

from sidecar.clock import FakeClock
from sidecar.errors import FailureMode, SidecarError
from sidecar.pipeline import compose
from sidecar.strategies.deadline import DeadlineConfig, DeadlineStrategy, caller_timeout
from sidecar.strategies.timeout import TimeoutConfig, TimeoutStrategy
from tests.unit.strategies.scripted import Scripted, hang, make_ctx, make_request, response

TINY = 0.001
LARGE = 60.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- caller_timeout ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.5", 1.5),
        (" 2 ", 2.0),
        ("0.25", 0.25),
        ("0", None),
        ("-1", None),
        ("abc", None),
        ("", None),
        ("nan", None),
        ("inf", None),
        ("-inf", None),
    ],
)
def test_x_request_timeout(value: str, expected: float | None) -> None:
    request = make_request(headers=[("x-request-timeout", value)])
    assert caller_timeout(request) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2S", 2.0),
        ("100m", 0.1),
        ("1H", 3600.0),
        ("5M", 300.0),
        ("250000u", 0.25),
        ("7n", 7e-9),
        ("99999999S", 99999999.0),
        (" 3S ", 3.0),
        ("0S", None),  # gRPC's TimeoutValue is a positive integer
        ("0m", None),
        ("123456789S", None),  # at most 8 digits
        ("1.5S", None),
        ("10s", None),
        ("10", None),
        ("S", None),
        ("-1S", None),
        ("", None),
    ],
)
def test_grpc_timeout(value: str, expected: float | None) -> None:
    request = make_request(headers=[("grpc-timeout", value)])
    result = caller_timeout(request)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


def test_header_names_are_case_insensitive() -> None:
    assert caller_timeout(make_request(headers=[("X-Request-Timeout", "3")])) == 3.0
    assert caller_timeout(make_request(headers=[("Grpc-Timeout", "4S")])) == 4.0


def test_x_request_timeout_wins_over_grpc_timeout() -> None:
    headers = [("grpc-timeout", "9S"), ("x-request-timeout", "2")]
    assert caller_timeout(make_request(headers=headers)) == 2.0


def test_bad_x_request_timeout_falls_back_to_grpc_timeout() -> None:
    headers = [("x-request-timeout", "soon"), ("grpc-timeout", "3S")]
    assert caller_timeout(make_request(headers=headers)) == 3.0


def test_no_header_no_caller_timeout() -> None:
    assert caller_timeout(make_request()) is None


# -- DeadlineStrategy --------------------------------------------------------------------------


async def test_sets_the_deadline_from_the_policy(clock: FakeClock) -> None:
    ctx = make_ctx(clock)
    ok = response(200)
    result = await DeadlineStrategy(DeadlineConfig(total=LARGE))(make_request(), ctx, Scripted(ok))
    assert result is ok
    assert ctx.deadline == pytest.approx(clock.monotonic() + LARGE)
    assert ctx.events == []


@pytest.mark.parametrize(
    "headers",
    [[("x-request-timeout", "2")], [("grpc-timeout", "2000m")]],
    ids=["x-request-timeout", "grpc-timeout"],
)
async def test_caller_may_shorten_the_deadline(
    clock: FakeClock, headers: list[tuple[str, str]]
) -> None:
    ctx = make_ctx(clock)
    seen: list[float | None] = []

    async def upstream(request: object, c: object) -> object:
        seen.append(ctx.remaining())
        return response(200)

    strategy = DeadlineStrategy(DeadlineConfig(total=10.0))
    await strategy(make_request(headers=headers), ctx, Scripted(upstream))
    assert ctx.deadline == pytest.approx(clock.monotonic() + 2.0)
    assert seen == [pytest.approx(2.0)]


@pytest.mark.parametrize(
    "headers",
    [[("x-request-timeout", "30")], [("grpc-timeout", "1H")]],
    ids=["x-request-timeout", "grpc-timeout"],
)
async def test_caller_never_lengthens_the_deadline(
    clock: FakeClock, headers: list[tuple[str, str]]
) -> None:
    ctx = make_ctx(clock)
    strategy = DeadlineStrategy(DeadlineConfig(total=10.0))
    await strategy(make_request(headers=headers), ctx, Scripted(response(200)))
    assert ctx.deadline == pytest.approx(clock.monotonic() + 10.0)


@pytest.mark.parametrize("value", ["0", "-5", "nan", "junk"])
async def test_bad_caller_timeout_is_ignored(clock: FakeClock, value: str) -> None:
    ctx = make_ctx(clock)
    strategy = DeadlineStrategy(DeadlineConfig(total=10.0))
    request = make_request(headers=[("x-request-timeout", value)])
    await strategy(request, ctx, Scripted(response(200)))
    assert ctx.deadline == pytest.approx(clock.monotonic() + 10.0)


async def test_an_earlier_deadline_already_set_is_kept(clock: FakeClock) -> None:
    earlier = clock.monotonic() + 1.0
    ctx = make_ctx(clock, deadline=earlier)
    await DeadlineStrategy(DeadlineConfig(total=10.0))(make_request(), ctx, Scripted(response(200)))
    assert ctx.deadline == earlier


async def test_hung_request_is_deadline_exceeded(clock: FakeClock) -> None:
    ctx = make_ctx(clock)
    with pytest.raises(SidecarError) as info:
        await DeadlineStrategy(DeadlineConfig(total=TINY))(make_request(), ctx, Scripted(hang()))
    assert info.value.mode == FailureMode.DEADLINE_EXCEEDED
    (event,) = ctx.events
    assert event.name == "deadline_exceeded"
    assert event.attrs["budget"] == TINY


async def test_caller_timeout_shortens_the_real_timer(clock: FakeClock) -> None:
    ctx = make_ctx(clock)
    request = make_request(headers=[("x-request-timeout", str(TINY))])
    with pytest.raises(SidecarError) as info:
        await DeadlineStrategy(DeadlineConfig(total=LARGE))(request, ctx, Scripted(hang()))
    assert info.value.mode == FailureMode.DEADLINE_EXCEEDED


async def test_a_timeout_raised_inside_is_not_relabelled(clock: FakeClock) -> None:
    with pytest.raises(TimeoutError):
        await DeadlineStrategy(DeadlineConfig(total=LARGE))(
            make_request(), make_ctx(clock), Scripted(TimeoutError("inner"))
        )


async def test_deadline_binds_the_attempt_timeout_inside_it(clock: FakeClock) -> None:
    # With the caller's short deadline, the inner attempt timeout reports deadline_exceeded,
    # not attempt_timeout: the attempt limit was not what ran out.
    handler = compose(
        [DeadlineStrategy(DeadlineConfig(total=LARGE)), TimeoutStrategy(TimeoutConfig(LARGE))],
        Scripted(hang()),
    )
    ctx = make_ctx(clock)
    request = make_request(headers=[("grpc-timeout", "1m")])
    with pytest.raises(SidecarError) as info:
        await handler(request, ctx)
    assert info.value.mode == FailureMode.DEADLINE_EXCEEDED
    assert "attempt_timeout" not in [e.name for e in ctx.events]


async def test_zero_grpc_timeout_is_ignored_not_an_instant_failure(clock: FakeClock) -> None:
    handler = compose(
        [DeadlineStrategy(DeadlineConfig(total=LARGE)), TimeoutStrategy(TimeoutConfig(LARGE))],
        Scripted(response(200)),
    )
    ctx = make_ctx(clock)
    result = await handler(make_request(headers=[("grpc-timeout", "0S")]), ctx)
    assert result.status == 200
    assert ctx.deadline == pytest.approx(clock.monotonic() + LARGE)
