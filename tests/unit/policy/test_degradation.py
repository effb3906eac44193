"""The `concurrency` and `fallback` sections: parsing, field-path errors, and what the builder
makes of them."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.policy.builder import build_runtime
from sidecar.policy.loader import PolicyError, parse_policy
from sidecar.server.state import SidecarState
from sidecar.strategies.fallback import (
    CacheFallback,
    RulesFallback,
    StaticFallback,
    UpstreamFallback,
)


def policy(*routes: dict[str, Any], **upstreams: Any) -> dict[str, Any]:
    ups = upstreams or {"model": {"url": "http://127.0.0.1:8080"}}
    return {"upstreams": ups, "routes": list(routes)}


def route(**fields: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"name": "r", "upstream": "model"}
    r.update(fields)
    return r


def errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(data)
    return info.value.errors


def test_a_chain_parses_in_order() -> None:
    chain = [
        {"upstream": "small"},
        {"cache": {"ttl": "5m", "key_headers": ["Authorization", "X-Tenant"]}},
        {"rules": [{"when": "request.a > 1", "respond": {"status": 202, "json": {"x": 1}}}]},
        {"static": {"headers": {"x-why": "outage"}, "json": {"decision": "review"}}},
    ]
    p = parse_policy(
        policy(
            route(fallback=chain),
            model={"url": "http://127.0.0.1:8080"},
            small={"url": "http://127.0.0.1:8081"},
        )
    )
    links = p.routes[0].fallback
    assert [link.kind for link in links] == ["upstream", "cache", "rules", "static"]
    assert links[1].cache is not None
    assert links[1].cache.ttl == 300.0
    assert links[1].cache.key_headers == ("authorization", "x-tenant")


@pytest.mark.parametrize(
    ("chain", "message"),
    [
        (
            [{"static": {}, "cache": {}}],
            "routes[0].fallback[0]: each fallback is exactly one of upstream, cache, rules or "
            "static (got cache, static)",
        ),
        ([{"surprise": {}}], "routes[0].fallback[0].surprise: unknown field"),
        ([{"static": {"status": 99}}], "routes[0].fallback[0].static.status: Input should be"),
        (
            [{"static": {"headers": {"Content-Length": "1"}}}],
            "routes[0].fallback[0].static.headers: 'Content-Length' is set by the sidecar",
        ),
        (
            [{"static": {"headers": {"x-a": "1\r\nx-b: 2"}}}],
            "routes[0].fallback[0].static.headers: the value of 'x-a' must not contain",
        ),
        (
            [{"static": {"json": {}, "body": "x"}}],
            "routes[0].fallback[0].static: give either json or body, not both",
        ),
        ([{"upstream": "nope"}], "routes[0].fallback[0].upstream: no upstream named 'nope'"),
        ([{"upstream": "model"}], "routes[0].fallback[0].upstream: 'model' is the route's own"),
        (
            [{"static": {}}, {"cache": {}}],
            "routes[0].fallback[1]: never reached: the static fallback at fallback[0]",
        ),
        (
            [
                {"cache": {}},
                {"rules": [{"when": "true", "respond": {}}, {"when": "a +", "respond": {}}]},
            ],
            "routes[0].fallback[1].rules[1].when: not a valid CEL expression at line 1, column",
        ),
    ],
)
def test_bad_chains_name_the_field(chain: list[Any], message: str) -> None:
    found = errors(policy(route(fallback=chain)))
    assert any(e.startswith(message) for e in found), found


def test_concurrency_must_stay_below_the_pool() -> None:
    found = errors(
        policy(
            route(concurrency={"max_in_flight": 300}),
            model={
                "url": "http://127.0.0.1:8080",
                "pool_size": 100,
                "concurrency": {"max_in_flight": 100},
            },
        )
    )
    assert any(
        e.startswith("upstreams.model.concurrency.max_in_flight: 100 must be below") for e in found
    )
    assert any(
        e.startswith("routes[0].concurrency.max_in_flight: 300 must be below") for e in found
    )
    found = errors(
        policy(route(concurrency={"adaptive": True, "max_in_flight": 4, "min_in_flight": 8}))
    )
    assert found == ["routes[0].concurrency.min_in_flight: larger than max_in_flight (4)"]


def test_builder_shares_bulkheads_per_upstream_and_keeps_route_overrides_apart() -> None:
    p = parse_policy(
        policy(
            route(name="a"),
            route(name="b"),
            route(name="c", concurrency={"max_in_flight": 2}),
            model={"url": "http://127.0.0.1:8080", "concurrency": {"max_in_flight": 8}},
        )
    )
    state = SidecarState()
    build_runtime(p, "test", state)
    assert sorted(state.bulkheads) == ["model", "model@c"]
    assert state.bulkheads["model"].current_limit() == 8
    assert state.bulkheads["model@c"].current_limit() == 2
    first = state.bulkheads["model"]
    first.in_flight = 3  # requests in flight across a reload that changes the limit
    reloaded = parse_policy(
        policy(
            route(name="a"),
            model={"url": "http://127.0.0.1:8080", "concurrency": {"max_in_flight": 4}},
        )
    )
    build_runtime(reloaded, "test", state)
    assert state.bulkheads["model"] is first
    assert first.in_flight == 3 and first.current_limit() == 4


def test_builder_exposes_the_chain_on_the_route_and_keeps_the_cache_across_reloads() -> None:
    chain = [
        {"upstream": "small"},
        {"cache": {}},
        {"rules": [{"when": "true", "respond": {"json": {"x": 1}}}]},
        {"static": {"json": {"decision": "review"}}},
    ]
    data = policy(
        route(fallback=chain),
        model={"url": "http://127.0.0.1:8080"},
        small={"url": "http://127.0.0.1:8081", "breaker": {"consecutive_failures": 2}},
    )
    state = SidecarState()
    runtime = build_runtime(parse_policy(data), "test", state)
    fallback = runtime.routes[0].fallback
    assert fallback is not None
    kinds = [type(link) for link in fallback.chain]
    assert kinds == [UpstreamFallback, CacheFallback, RulesFallback, StaticFallback]
    assert state.breakers["small"].config.consecutive_failures == 2  # small's own breaker
    cache = state.fallback_caches["r"]
    runtime = build_runtime(parse_policy(data), "test", state)
    assert runtime.routes[0].fallback is not None
    assert runtime.routes[0].fallback.chain[1] == CacheFallback(cache)
    assert build_runtime(parse_policy(policy(route())), "t", state).routes[0].fallback is None
