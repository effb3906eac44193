"""FallbackStrategy: when the chain runs, its order, each kind, and the last-known-good cache."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.clock import FakeClock
from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.outcome import Outcome
from sidecar.pipeline import ProxyResponse, RequestBody
from sidecar.strategies.fallback import (
    CacheFallback,
    FallbackConfig,
    FallbackLink,
    FallbackStrategy,
    ResponseTemplate,
    Rule,
    RulesFallback,
    StaticFallback,
    UpstreamFallback,
)
from sidecar.strategies.last_known_good import CacheConfig, LastKnownGood
from sidecar.strategies.rules import CelPredicate
from tests.unit.strategies.scripted import (
    Scripted,
    StreamingBody,
    make_ctx,
    make_request,
    response,
)

DOWN = SidecarError(FailureMode.CONNECT_ERROR, "refused")
SAFE = ResponseTemplate.from_json(200, [("x-safe", "1")], {"decision": "review"}, True)


def static(doc: Any = None) -> StaticFallback:
    if doc is None:
        return StaticFallback(SAFE)
    return StaticFallback(ResponseTemplate.from_json(200, [], doc, True))


def rules(*pairs: tuple[str, Any]) -> RulesFallback:
    return RulesFallback(
        tuple(
            Rule(CelPredicate(when), ResponseTemplate.from_json(200, [], doc, True))
            for when, doc in pairs
        )
    )


def cache(clock: FakeClock, **config: Any) -> CacheFallback:
    return CacheFallback(LastKnownGood(CacheConfig(**config), clock))


def fallback(*chain: FallbackLink, total: float = 10.0, gated: bool = False) -> FallbackStrategy:
    return FallbackStrategy(FallbackConfig(route="r", total=total, gated=gated), chain)


async def body_of(resp: ProxyResponse) -> bytes:
    out = b""
    while chunk := await resp.body.read_chunk():
        out += chunk
    return out


def names(ctx: RequestContext) -> list[tuple[str, str]]:
    return [(e.name, e.attrs["kind"]) for e in ctx.events if e.name.startswith("fallback")]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- when the chain runs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode",
    [
        FailureMode.CONNECT_ERROR,
        FailureMode.ATTEMPT_TIMEOUT,
        FailureMode.UPSTREAM_5XX,
        FailureMode.INVALID_OUTPUT,
        FailureMode.CIRCUIT_OPEN,
        FailureMode.OVERLOADED,
        FailureMode.DEADLINE_EXCEEDED,
    ],
)
async def test_availability_failures_get_the_fallback_answer(
    clock: FakeClock, mode: FailureMode
) -> None:
    ctx = make_ctx(clock)
    resp = await fallback(static())(make_request(), ctx, Scripted(SidecarError(mode, "down")))
    assert resp.status == 200
    assert json.loads(await body_of(resp)) == {"decision": "review"}
    assert ("x-safe", "1") in resp.headers
    assert resp.header("content-type") == "application/json"
    assert ctx.outcome == Outcome.FALLBACK
    assert ctx.fallback_kind == "static"
    assert ctx.failure_mode == mode  # the original cause is kept for x-sidecar-failure-mode
    (event,) = [e for e in ctx.events if e.name == "fallback"]
    assert event.attrs == {"kind": "static", "cause": mode.value, "position": 0}


@pytest.mark.parametrize("mode", [FailureMode.CLIENT_ERROR, FailureMode.CLIENT_CANCELLED])
async def test_client_side_failures_are_not_answered_by_the_chain(
    clock: FakeClock, mode: FailureMode
) -> None:
    ctx = make_ctx(clock)
    with pytest.raises(SidecarError) as info:
        await fallback(static())(make_request(), ctx, Scripted(SidecarError(mode, "x")))
    assert info.value.mode == mode
    assert ctx.fallback_kind is None and ctx.outcome is None


async def test_good_answers_pass_through_untouched(clock: FakeClock) -> None:
    ctx = make_ctx(clock)
    resp = await fallback(static())(make_request(), ctx, Scripted(response(200, b'{"a":1}')))
    assert await body_of(resp) == b'{"a":1}'
    assert ctx.fallback_kind is None and not ctx.events


async def test_no_fallback_once_bytes_reached_the_caller(clock: FakeClock) -> None:
    ctx = make_ctx(clock, response_started=True)
    with pytest.raises(SidecarError):
        await fallback(static())(make_request(), ctx, Scripted(DOWN))


# -- order and exhaustion ----------------------------------------------------------------------


async def test_chain_is_tried_in_order_until_one_answers(clock: FakeClock) -> None:
    small = Scripted(response(503, b'{"error":"also down"}'))
    chain = fallback(
        UpstreamFallback("small", small),
        cache(clock),
        rules(("request.amount > 100.0", {"decision": "big"})),
        static(),
        total=5.0,
    )
    ctx = make_ctx(clock)
    resp = await chain(make_request(b'{"amount": 1.0}'), ctx, Scripted(DOWN))
    assert json.loads(await body_of(resp)) == {"decision": "review"}
    assert names(ctx) == [
        ("fallback_failed", "upstream"),
        ("fallback_failed", "cache"),
        ("fallback_failed", "rules"),
        ("fallback", "static"),
    ]
    reasons = [e.attrs["reason"] for e in ctx.events if e.name == "fallback_failed"]
    assert reasons == ["upstream_5xx", "miss", "no_rule_matched"]
    assert small.calls == 1
    assert small.returned[0].body.closed  # type: ignore[attr-defined]


async def test_exhausted_chain_raises_the_original_failure(clock: FakeClock) -> None:
    small = Scripted(SidecarError(FailureMode.CIRCUIT_OPEN, "small is open too"))
    ctx = make_ctx(clock)
    with pytest.raises(SidecarError) as info:
        await fallback(UpstreamFallback("small", small), cache(clock))(
            make_request(), ctx, Scripted(DOWN)
        )
    assert info.value is DOWN
    assert ctx.failure_mode == FailureMode.CONNECT_ERROR
    assert ctx.fallback_kind is None and ctx.outcome is None
    reasons = [e.attrs["reason"] for e in ctx.events if e.name == "fallback_failed"]
    assert reasons == ["circuit_open", "miss"]


async def test_failing_answer_triggers_and_is_returned_intact_when_exhausted(
    clock: FakeClock,
) -> None:
    ctx = make_ctx(clock)
    original = response(502, StreamingBody([b'{"error":', b'"bad gateway"}']))
    resp = await fallback(cache(clock))(make_request(), ctx, Scripted(original))
    assert resp.status == 502
    assert await body_of(resp) == b'{"error":"bad gateway"}'
    assert ctx.failure_mode == FailureMode.UPSTREAM_5XX and ctx.fallback_kind is None

    ctx = make_ctx(clock)
    limited_body = StreamingBody([b"slow down"])
    resp = await fallback(static())(make_request(), ctx, Scripted(response(429, limited_body)))
    assert resp.status == 200 and ctx.fallback_kind == "static"
    assert ctx.failure_mode == FailureMode.UPSTREAM_RATE_LIMITED
    assert limited_body.closed  # the failing answer's connection is let go


async def test_run_chain_answers_or_raises_the_cause(clock: FakeClock) -> None:
    cause = SidecarError(FailureMode.LOW_CONFIDENCE, "0.41 is below the auto band")
    ctx = make_ctx(clock)
    resp = await fallback(static()).run_chain(make_request(), ctx, cause)
    assert resp.status == 200 and ctx.fallback_kind == "static"
    assert ctx.failure_mode == FailureMode.LOW_CONFIDENCE
    with pytest.raises(SidecarError) as info:
        await fallback(cache(clock)).run_chain(make_request(), make_ctx(clock), cause)
    assert info.value is cause


# -- upstream ----------------------------------------------------------------------------------


async def test_fallback_upstream_answers_and_gets_the_request(clock: FakeClock) -> None:
    small = Scripted(response(200, b'{"model":"small"}'))
    ctx = make_ctx(clock, breaker_state="open")
    resp = await fallback(UpstreamFallback("small", small), static())(
        make_request(b'{"q":1}'), ctx, Scripted(SidecarError(FailureMode.CIRCUIT_OPEN, "open"))
    )
    assert await body_of(resp) == b'{"model":"small"}'
    assert small.requests[0].body.data == b'{"q":1}'
    assert ctx.fallback_kind == "upstream"
    assert ctx.breaker_state == "open"  # the primary's state stays in the log
    (event,) = [e for e in ctx.events if e.name == "fallback"]
    assert event.attrs["upstream"] == "small"


async def test_fallback_upstream_runs_on_what_is_left_of_the_deadline(clock: FakeClock) -> None:
    small = Scripted(response(200))
    ctx = make_ctx(clock)
    ctx.deadline = clock.monotonic()  # the primary used all of it
    resp = await fallback(UpstreamFallback("small", small), static())(
        make_request(), ctx, Scripted(SidecarError(FailureMode.DEADLINE_EXCEEDED, "late"))
    )
    assert small.calls == 0
    assert ctx.fallback_kind == "static"
    assert [e.attrs["reason"] for e in ctx.events if e.name == "fallback_failed"] == ["deadline"]
    assert resp.status == 200


async def test_a_shed_request_gets_the_route_deadline_for_its_chain(clock: FakeClock) -> None:
    ctx = make_ctx(clock)
    assert ctx.deadline is None  # shed before the total deadline was set
    small = Scripted(response(200))
    await fallback(UpstreamFallback("small", small), total=2.0)(
        make_request(headers=[("x-request-timeout", "0.5")]),
        ctx,
        Scripted(SidecarError(FailureMode.OVERLOADED, "shed")),
    )
    assert ctx.deadline == pytest.approx(ctx.started + 0.5)  # the caller asked for less


async def test_unreplayable_body_already_sent_skips_the_upstream(clock: FakeClock) -> None:
    async def rest() -> Any:
        yield b"tail"

    body = RequestBody(None, rest=rest(), prefix=b"head")
    small = Scripted(response(200))
    ctx = make_ctx(clock)
    resp = await fallback(UpstreamFallback("small", small), rules(("true", {})), static())(
        make_request(body), ctx, Scripted(DOWN)
    )
    assert small.calls == 0 and resp.status == 200
    reasons = [e.attrs["reason"] for e in ctx.events if e.name == "fallback_failed"]
    assert reasons == ["body_not_replayable", "body_not_replayable"]


# -- rules -------------------------------------------------------------------------------------


async def test_first_matching_rule_picks_the_template(clock: FakeClock) -> None:
    chain = fallback(
        rules(
            ("request.inputs[0].data[0] > 10000.0", {"decision": "review"}),
            ('headers["x-tier"] == "gold"', {"decision": "approve"}),
            ("true", {"decision": "decline"}),
        )
    )

    async def decide(doc: Any, headers: list[tuple[str, str]] | None = None) -> Any:
        ctx = make_ctx(clock)
        req = make_request(json.dumps(doc).encode(), headers=headers)
        resp = await chain(req, ctx, Scripted(DOWN))
        assert ctx.fallback_kind == "rules"
        return json.loads(await body_of(resp))["decision"], ctx

    big = {"inputs": [{"data": [20000.0]}]}
    small = {"inputs": [{"data": [5.0]}]}
    assert (await decide(big))[0] == "review"
    assert (await decide(small, [("X-Tier", "gold")]))[0] == "approve"
    decision, ctx = await decide({"other": True})  # rule 0 cannot evaluate: it does not match
    assert decision == "decline"
    (event,) = [e for e in ctx.events if e.name == "fallback"]
    assert event.attrs["rule"] == 2


async def test_rules_see_null_for_a_body_that_is_not_json(clock: FakeClock) -> None:
    chain = fallback(rules(("request == null", {"decision": "no body"})))
    resp = await chain(make_request(b"not json"), make_ctx(clock), Scripted(DOWN))
    assert json.loads(await body_of(resp)) == {"decision": "no body"}


# -- cache -------------------------------------------------------------------------------------


async def serve(
    chain: FallbackStrategy,
    clock: FakeClock,
    upstream: Any,
    body: bytes = b'{"q":1}',
    headers: list[tuple[str, str]] | None = None,
    band: str | None = None,
) -> tuple[ProxyResponse | SidecarError, RequestContext]:
    """One request as the server runs it: the pipeline, the whole body, then the finish hooks."""
    ctx = make_ctx(clock)
    try:
        resp = await chain(make_request(body, headers=headers), ctx, Scripted(upstream))
    except SidecarError as err:
        ctx.finish()
        return err, ctx
    ctx.confidence_band = band
    data = await body_of(resp)
    resp.body = StreamingBody([data])  # what the caller got, to assert on
    ctx.finish()
    return resp, ctx


async def test_cache_answers_with_the_last_good_answer_for_the_same_caller(
    clock: FakeClock,
) -> None:
    chain = fallback(cache(clock, ttl=60.0))
    alice = [("Authorization", "Bearer alice")]
    bob = [("Authorization", "Bearer bob")]
    good = response(200, StreamingBody([b'{"answer":', b'"alice"}']), headers=[("x-model", "m")])
    await serve(chain, clock, good, headers=alice)
    resp, ctx = await serve(chain, clock, DOWN, headers=alice)
    assert isinstance(resp, ProxyResponse)
    assert await body_of(resp) == b'{"answer":"alice"}'
    assert ctx.fallback_kind == "cache" and ctx.failure_mode == FailureMode.CONNECT_ERROR
    # Another caller, the same body: never alice's answer.
    resp, ctx = await serve(chain, clock, DOWN, headers=bob)
    assert resp is DOWN and ctx.fallback_kind is None
    # No identity at all is a caller of its own too.
    resp, _ = await serve(chain, clock, DOWN)
    assert resp is DOWN
    # Another body from alice: a miss.
    resp, _ = await serve(chain, clock, DOWN, body=b'{"q":2}', headers=alice)
    assert resp is DOWN


async def test_cache_replays_status_and_headers_but_not_delivery_headers(
    clock: FakeClock,
) -> None:
    chain = fallback(cache(clock))
    headers = [("x-model", "m"), ("Date", "yesterday"), ("x-sidecar-outcome", "ok")]
    await serve(chain, clock, response(201, b"{}", headers=headers))
    clock.advance(7)
    resp, _ = await serve(chain, clock, DOWN)
    assert isinstance(resp, ProxyResponse)
    assert resp.status == 201
    assert resp.header("x-model") == "m" and resp.header("age") == "7"
    assert resp.header("date") is None and resp.header("x-sidecar-outcome") is None


async def test_cache_entries_expire_and_the_oldest_go_first(clock: FakeClock) -> None:
    chain = fallback(cache(clock, ttl=10.0, max_entries=2))
    for q in (b"1", b"2", b"3"):
        await serve(chain, clock, response(200, b"answer " + q), body=q)
    assert (await serve(chain, clock, DOWN, body=b"1"))[0] is DOWN  # evicted (LRU)
    assert isinstance((await serve(chain, clock, DOWN, body=b"2"))[0], ProxyResponse)
    clock.advance(10.5)
    assert (await serve(chain, clock, DOWN, body=b"3"))[0] is DOWN  # expired


async def test_cache_stores_only_good_fully_delivered_answers(clock: FakeClock) -> None:
    link = cache(clock, max_body=8)
    chain = fallback(link)
    _, big = await serve(chain, clock, response(200, b"0123456789"), body=b"big")
    assert [e.attrs for e in big.events if e.name == "cache_store_skipped"] == [
        {"reason": "too_large"}
    ]
    await serve(chain, clock, response(200, b"fine"), body=b"fine")
    assert len(link.cache) == 1  # "fine" only
    # A stream that broke on its way to the caller is not a good answer.
    ctx = make_ctx(clock)
    resp = await chain(make_request(b"broken"), ctx, Scripted(response(200, b"x")))
    await body_of(resp)
    ctx.failure_mode = FailureMode.STREAM_INTERRUPTED
    ctx.finish()
    # Nor is an answer the caller never got to the end of.
    ctx = make_ctx(clock)
    resp = await chain(
        make_request(b"half"), ctx, Scripted(response(200, StreamingBody([b"a", b"b"])))
    )
    await resp.body.read_chunk()
    ctx.finish()
    await serve(chain, clock, response(404, b"nope"), body=b"404")
    assert len(link.cache) == 1


async def test_gated_route_caches_only_the_auto_band(clock: FakeClock) -> None:
    link = cache(clock)
    chain = fallback(link, gated=True)
    await serve(chain, clock, response(200, b"review"), body=b"a", band="review")
    await serve(chain, clock, response(200, b"unjudged"), body=b"b", band=None)
    assert len(link.cache) == 0
    await serve(chain, clock, response(200, b"auto"), body=b"c", band="auto")
    resp, _ = await serve(chain, clock, DOWN, body=b"c")
    assert isinstance(resp, ProxyResponse) and await body_of(resp) == b"auto"


async def test_fallback_answers_are_not_cached(clock: FakeClock) -> None:
    link = cache(clock)
    chain = fallback(link, static())
    await serve(chain, clock, DOWN)
    assert len(link.cache) == 0


async def test_cache_and_rules_skip_a_body_too_large_to_keep(clock: FakeClock) -> None:
    async def rest() -> Any:
        yield b""

    link = cache(clock)
    ctx = make_ctx(clock)
    body = RequestBody(None, rest=rest(), prefix=b"x" * 10)
    resp = await fallback(link, rules(("true", {})), static())(
        make_request(body), ctx, Scripted(SidecarError(FailureMode.CIRCUIT_OPEN, "open"))
    )
    assert resp.status == 200 and ctx.fallback_kind == "static"
    reasons = [e.attrs["reason"] for e in ctx.events if e.name == "fallback_failed"]
    assert reasons == ["body_not_replayable", "body_not_replayable"]
