"""Policy → config for graceful degradation: bulkheads and the fallback chain.

The builder composes the strategies; this module turns the `concurrency` and `fallback` sections
into plain configs (compiling CEL rules once) and finds what a policy gets wrong about them, each
with its field path, so `sidecar validate` fails on a bad rule instead of the first outage.
"""

from __future__ import annotations

from sidecar.policy.schema import (
    CacheFallbackPolicy,
    ConcurrencyPolicy,
    Policy,
    ResponseTemplatePolicy,
    RulePolicy,
)
from sidecar.strategies.bulkhead import BulkheadConfig
from sidecar.strategies.fallback import ResponseTemplate, Rule
from sidecar.strategies.last_known_good import CacheConfig
from sidecar.strategies.rules import CelCompileError, CelPredicate

__all__ = [
    "bulkhead_config",
    "cache_config",
    "compile_rules",
    "degradation_issues",
    "response_template",
]


def bulkhead_config(policy: ConcurrencyPolicy) -> BulkheadConfig:
    return BulkheadConfig(
        max_in_flight=policy.max_in_flight,
        queue=policy.queue,
        queue_timeout=policy.queue_timeout,
        retry_after=policy.retry_after,
        adaptive=policy.adaptive,
        adaptive_latency=policy.adaptive_latency,
        min_in_flight=min(policy.min_in_flight, policy.max_in_flight),
        backoff_ratio=policy.backoff_ratio,
    )


def cache_config(policy: CacheFallbackPolicy) -> CacheConfig:
    return CacheConfig(
        ttl=policy.ttl,
        max_entries=policy.max_entries,
        key_headers=policy.key_headers,
        max_body=policy.max_body,
    )


def response_template(policy: ResponseTemplatePolicy) -> ResponseTemplate:
    headers = list(policy.headers.items())
    if policy.body is not None:
        return ResponseTemplate(policy.status, tuple(headers), policy.body.encode())
    return ResponseTemplate.from_json(policy.status, headers, policy.json_, policy.has_body)


def compile_rules(rules: tuple[RulePolicy, ...]) -> tuple[Rule, ...]:
    """Compile every rule's CEL expression (raises `CelCompileError` on the first bad one)."""
    return tuple(
        Rule(when=CelPredicate(rule.when), respond=response_template(rule.respond))
        for rule in rules
    )


def _concurrency_issues(where: str, c: ConcurrencyPolicy, pool_size: int) -> list[str]:
    issues = []
    if c.max_in_flight >= pool_size:
        issues.append(
            f"{where}.max_in_flight: {c.max_in_flight} must be below the upstream's pool_size "
            f"({pool_size}), so waiting for a pooled connection is never mistaken for a failure"
        )
    if c.adaptive and c.min_in_flight > c.max_in_flight:
        issues.append(f"{where}.min_in_flight: larger than max_in_flight ({c.max_in_flight})")
    return issues


def degradation_issues(policy: Policy) -> list[str]:
    """Problems in `concurrency` and `fallback` sections, each with its field path."""
    issues: list[str] = []
    for name, upstream in policy.upstreams.items():
        if upstream.concurrency is not None:
            issues += _concurrency_issues(
                f"upstreams.{name}.concurrency", upstream.concurrency, upstream.pool_size
            )
    default_upstream = policy.default_upstream or next(iter(policy.upstreams), None)
    for i, route in enumerate(policy.routes):
        own = route.upstream or default_upstream
        if route.concurrency is not None and own in policy.upstreams:
            issues += _concurrency_issues(
                f"routes[{i}].concurrency", route.concurrency, policy.upstreams[own].pool_size
            )
        static_at: int | None = None
        for j, link in enumerate(route.fallback):
            where = f"routes[{i}].fallback[{j}]"
            if static_at is not None:
                issues.append(
                    f"{where}: never reached: the static fallback at fallback[{static_at}] "
                    "always answers"
                )
            if link.static is not None and static_at is None:
                static_at = j
            if link.upstream is not None:
                if link.upstream not in policy.upstreams:
                    issues.append(
                        f"{where}.upstream: no upstream named {link.upstream!r} "
                        f"(have: {', '.join(sorted(policy.upstreams))})"
                    )
                elif link.upstream == own:
                    issues.append(
                        f"{where}.upstream: {link.upstream!r} is the route's own upstream; "
                        "a fallback must be another one"
                    )
            for k, rule in enumerate(link.rules or ()):
                try:
                    CelPredicate(rule.when)
                except CelCompileError as exc:
                    issues.append(f"{where}.rules[{k}].when: {exc.message}")
    return issues
