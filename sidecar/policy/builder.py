"""Turn a validated `Policy` into what runs: routes with their composed strategy pipelines.

Long-lived resources that must survive a policy reload (upstream clients, breakers, budgets) come
from `Resources`, keyed by upstream, so swapping a policy never resets a breaker or drops a pool.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sidecar.context import RequestContext
from sidecar.pipeline import Handler, ProxyRequest, ProxyResponse, Strategy, compose
from sidecar.policy.confidence import confidence_gate
from sidecar.policy.degradation import (
    bulkhead_config,
    cache_config,
    compile_rules,
    response_template,
)
from sidecar.policy.schema import (
    BreakerPolicy,
    ConcurrencyPolicy,
    HedgePolicy,
    Policy,
    RoutePolicy,
    UpstreamPolicy,
)
from sidecar.review.store import ReviewQueue
from sidecar.strategies.breaker import BreakerConfig, BreakerStrategy, CircuitBreaker
from sidecar.strategies.budget import RetryBudget, RetryBudgetConfig
from sidecar.strategies.bulkhead import Bulkhead, BulkheadConfig, BulkheadStrategy
from sidecar.strategies.deadline import DeadlineConfig, DeadlineStrategy
from sidecar.strategies.fallback import (
    CacheFallback,
    FallbackConfig,
    FallbackLink,
    FallbackStrategy,
    RulesFallback,
    StaticFallback,
    UpstreamFallback,
)
from sidecar.strategies.hedge import HedgeConfig, HedgeStrategy
from sidecar.strategies.last_known_good import CacheConfig, LastKnownGood
from sidecar.strategies.latency import LatencyTracker
from sidecar.strategies.retry import RetryConfig, RetryStrategy
from sidecar.strategies.timeout import TimeoutConfig, TimeoutStrategy
from sidecar.strategies.validate import ValidateConfig, ValidateStrategy
from sidecar.telemetry.events import run_attempt
from sidecar.transport.client import UpstreamClient

__all__ = ["Resources", "RouteRuntime", "RuntimePolicy", "build_runtime"]


class Resources(Protocol):
    """Long-lived, per-app objects handed to the pipeline (kept across policy reloads)."""

    def client(self, name: str, upstream: UpstreamPolicy) -> UpstreamClient: ...

    def breaker(self, key: str, config: BreakerConfig) -> CircuitBreaker: ...

    def budget(self, route: str, config: RetryBudgetConfig) -> RetryBudget: ...

    def latency(self, upstream: str) -> LatencyTracker: ...

    def bulkhead(self, key: str, config: BulkheadConfig) -> Bulkhead: ...

    def fallback_cache(self, route: str, config: CacheConfig) -> LastKnownGood: ...

    def review_queue(self) -> ReviewQueue | None: ...


def breaker_config(policy: BreakerPolicy) -> BreakerConfig:
    return BreakerConfig(
        enabled=policy.enabled,
        consecutive_failures=policy.consecutive_failures,
        failure_ratio=policy.failure_ratio,
        min_calls=policy.min_calls,
        window=policy.window,
        open_for=policy.open_for,
        open_for_max=policy.open_for_max,
        jitter=policy.jitter,
        half_open_probes=policy.half_open_probes,
        storage=policy.storage,
        storage_prefix=policy.storage_prefix,
    )


def hedge_config(policy: HedgePolicy) -> HedgeConfig:
    return HedgeConfig(
        delay=policy.seconds or 0.0,
        quantile=policy.quantile,
        max_hedges=policy.max_hedges,
    )


def load_json_schema(path: str, base_dir: Path) -> dict[str, Any]:
    """Read a JSON Schema file named by a policy (relative paths from the policy's folder)."""
    full = Path(path) if Path(path).is_absolute() else base_dir / path
    data = json.loads(full.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("a JSON Schema must be an object")
    return data


@dataclass(frozen=True)
class RouteRuntime:
    name: str
    path_prefix: str
    methods: frozenset[str] | None
    upstream: str
    replay_limit: int
    handler: Handler
    policy: RoutePolicy
    #: The route's fallback chain (also run by the confidence gate for `fallback` actions).
    fallback: FallbackStrategy | None = None

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        prefix = self.path_prefix
        if prefix == "/" or path == prefix:
            return True
        if prefix.endswith("/"):
            return path.startswith(prefix)
        return path.startswith(prefix + "/")


@dataclass(frozen=True)
class RuntimePolicy:
    policy: Policy
    source: str
    routes: tuple[RouteRuntime, ...]

    @property
    def max_body(self) -> int:
        return self.policy.limits.max_body

    def match(self, method: str, path: str) -> RouteRuntime | None:
        for route in self.routes:
            if route.matches(method, path):
                return route
        return None


def _transport(client: UpstreamClient, route: RoutePolicy) -> Handler:
    timeouts = route.timeouts.effective()
    connect = timeouts.connect
    idle = timeouts.stream_idle

    origin = str(client.origin)

    async def send(request: ProxyRequest, ctx: RequestContext) -> ProxyResponse:
        ctx.attempts += 1

        async def attempt(request: ProxyRequest) -> ProxyResponse:
            return await client.send(request, ctx, connect_timeout=connect, idle_timeout=idle)

        # The attempt's client span; the trace context goes upstream in its headers.
        return await run_attempt(ctx, request, attempt, upstream=client.name, origin=origin)

    return send


def _route_pipeline(
    route: RoutePolicy,
    upstream_name: str,
    resources: Resources,
    policy: Policy,
    base_dir: Path,
    outer: Sequence[Strategy] = (),
) -> Handler:
    """The route's pipeline; `outer` strategies (fallback, bulkhead) wrap the total deadline."""
    upstream = policy.upstreams[upstream_name]
    client = resources.client(upstream_name, upstream)
    timeouts = route.timeouts.effective()
    if route.breaker is not None:
        breaker = resources.breaker(f"{upstream_name}@{route.name}", breaker_config(route.breaker))
    else:
        breaker = resources.breaker(upstream_name, breaker_config(upstream.breaker))
    budget = resources.budget(
        route.name,
        RetryBudgetConfig(
            ratio=route.retry_budget.ratio,
            min_per_second=route.retry_budget.min_per_second,
            ttl=route.retry_budget.ttl,
        ),
    )
    retry = RetryStrategy(
        RetryConfig(
            max_attempts=route.retry.max_attempts,
            backoff_base=route.retry.backoff.base,
            backoff_max=route.retry.backoff.max,
            idempotent=route.idempotent,
            honour_retry_after=route.retry.honour_retry_after,
        ),
        budget=budget,
        latency=resources.latency(upstream_name),
    )
    strategies: list[Strategy] = [
        *outer,
        DeadlineStrategy(DeadlineConfig(total=timeouts.total)),
        retry,
    ]
    if route.hedge.enabled:
        # Inside retry (a hedged round is one attempt to it), outside the breaker (each hedge is
        # an attempt of its own); hedges spend the route's retry budget.
        strategies.append(
            HedgeStrategy(hedge_config(route.hedge), budget, resources.latency(upstream_name))
        )
    strategies.append(BreakerStrategy(breaker))
    validate = _validate_strategy(route, base_dir)
    if validate is not None:
        strategies.append(validate)
    strategies.append(
        TimeoutStrategy(TimeoutConfig(attempt=timeouts.attempt, first_byte=timeouts.first_byte))
    )
    return compose(strategies, _transport(client, route))


def _validate_strategy(route: RoutePolicy, base_dir: Path) -> ValidateStrategy | None:
    v = route.validate_
    if v is None:
        return None
    schema = load_json_schema(v.json_schema, base_dir) if v.json_schema else None
    return ValidateStrategy(
        ValidateConfig(
            json_body=v.json_body,
            schema=schema,
            reject_empty=v.reject_empty,
            reject_non_finite=v.reject_non_finite,
            max_body=v.max_body,
        )
    )


def _bulkhead_strategy(
    route: RoutePolicy, upstream_name: str, resources: Resources, policy: Policy
) -> BulkheadStrategy | None:
    """Per upstream (routes that share a model share its slots), or the route's own override."""
    concurrency: ConcurrencyPolicy | None = route.concurrency
    key = f"{upstream_name}@{route.name}"
    if concurrency is None:
        key, concurrency = upstream_name, policy.upstreams[upstream_name].concurrency
    if concurrency is None:
        return None
    return BulkheadStrategy(resources.bulkhead(key, bulkhead_config(concurrency)))


def _fallback_upstream_handler(
    name: str, route: RoutePolicy, resources: Resources, policy: Policy, base_dir: Path
) -> Handler:
    """A fallback model's own mini pipeline: its bulkhead (if any), its own breaker, the route's
    validation and attempt timeout; no retry (the chain moves on instead)."""
    upstream = policy.upstreams[name]
    timeouts = route.timeouts.effective()
    strategies: list[Strategy] = []
    if upstream.concurrency is not None:
        bulkhead = resources.bulkhead(name, bulkhead_config(upstream.concurrency))
        strategies.append(BulkheadStrategy(bulkhead))
    strategies.append(BreakerStrategy(resources.breaker(name, breaker_config(upstream.breaker))))
    validate = _validate_strategy(route, base_dir)
    if validate is not None:
        strategies.append(validate)
    strategies.append(
        TimeoutStrategy(TimeoutConfig(attempt=timeouts.attempt, first_byte=timeouts.first_byte))
    )
    return compose(strategies, _transport(resources.client(name, upstream), route))


def _fallback_strategy(
    route: RoutePolicy, resources: Resources, policy: Policy, base_dir: Path
) -> FallbackStrategy | None:
    if not route.fallback:
        return None
    chain: list[FallbackLink] = []
    for link in route.fallback:
        if link.upstream is not None:
            handler = _fallback_upstream_handler(link.upstream, route, resources, policy, base_dir)
            chain.append(UpstreamFallback(name=link.upstream, handler=handler))
        elif link.cache is not None:
            cache = resources.fallback_cache(route.name, cache_config(link.cache))
            chain.append(CacheFallback(cache))
        elif link.rules is not None:
            chain.append(RulesFallback(compile_rules(link.rules)))
        elif link.static is not None:
            chain.append(StaticFallback(response_template(link.static)))
    config = FallbackConfig(
        route=route.name,
        total=route.timeouts.effective().total,
        gated=getattr(route, "confidence", None) is not None,
    )
    return FallbackStrategy(config, chain)


def build_runtime(
    policy: Policy, source: str, resources: Resources, base_dir: Path | None = None
) -> RuntimePolicy:
    default_upstream = policy.default_upstream or next(iter(policy.upstreams))
    routes = []
    for route in policy.routes:
        upstream_name = route.upstream or default_upstream
        # Fallback → Bulkhead, outside the total deadline (DESIGN.md's order).
        fallback = _fallback_strategy(route, resources, policy, base_dir or Path.cwd())
        bulkhead = _bulkhead_strategy(route, upstream_name, resources, policy)
        # The confidence gate judges what would go to the caller: outermost of all.
        gate = confidence_gate(route, resources.review_queue(), fallback)
        outer: list[Strategy] = [s for s in (gate, fallback, bulkhead) if s is not None]
        routes.append(
            RouteRuntime(
                name=route.name,
                path_prefix=route.match.path_prefix,
                methods=frozenset(route.match.methods) if route.match.methods else None,
                upstream=upstream_name,
                replay_limit=route.retry.replay_limit,
                handler=_route_pipeline(
                    route, upstream_name, resources, policy, base_dir or Path.cwd(), outer
                ),
                policy=route,
                fallback=fallback,
            )
        )
    return RuntimePolicy(policy=policy, source=source, routes=tuple(routes))
