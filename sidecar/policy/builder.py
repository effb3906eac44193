"""Turn a validated `Policy` into what runs: routes with their composed strategy pipelines.

Long-lived resources that must survive a policy reload (upstream clients, breakers, budgets) come
from `Resources`, keyed by upstream, so swapping a policy never resets a breaker or drops a pool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sidecar.context import RequestContext
from sidecar.pipeline import Handler, ProxyRequest, ProxyResponse, Strategy, compose
from sidecar.policy.schema import BreakerPolicy, Policy, RoutePolicy, UpstreamPolicy
from sidecar.strategies.breaker import BreakerConfig, BreakerStrategy, CircuitBreaker
from sidecar.strategies.budget import RetryBudget, RetryBudgetConfig
from sidecar.strategies.deadline import DeadlineConfig, DeadlineStrategy
from sidecar.strategies.latency import LatencyTracker
from sidecar.strategies.retry import RetryConfig, RetryStrategy
from sidecar.strategies.timeout import TimeoutConfig, TimeoutStrategy
from sidecar.strategies.validate import ValidateConfig, ValidateStrategy
from sidecar.transport.client import UpstreamClient

__all__ = ["Resources", "RouteRuntime", "RuntimePolicy", "build_runtime"]


class Resources(Protocol):
    """Long-lived, per-app objects handed to the pipeline (kept across policy reloads)."""

    def client(self, name: str, upstream: UpstreamPolicy) -> UpstreamClient: ...

    def breaker(self, key: str, config: BreakerConfig) -> CircuitBreaker: ...

    def budget(self, route: str, config: RetryBudgetConfig) -> RetryBudget: ...

    def latency(self, upstream: str) -> LatencyTracker: ...


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

    async def send(request: ProxyRequest, ctx: RequestContext) -> ProxyResponse:
        ctx.attempts += 1
        return await client.send(request, ctx, connect_timeout=connect, idle_timeout=idle)

    return send


def _route_pipeline(
    route: RoutePolicy, upstream_name: str, resources: Resources, policy: Policy, base_dir: Path
) -> Handler:
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
        DeadlineStrategy(DeadlineConfig(total=timeouts.total)),
        retry,
        BreakerStrategy(breaker),
    ]
    if route.validate_ is not None:
        v = route.validate_
        schema = load_json_schema(v.json_schema, base_dir) if v.json_schema else None
        strategies.append(
            ValidateStrategy(
                ValidateConfig(
                    json_body=v.json_body,
                    schema=schema,
                    reject_empty=v.reject_empty,
                    reject_non_finite=v.reject_non_finite,
                    max_body=v.max_body,
                )
            )
        )
    strategies.append(
        TimeoutStrategy(TimeoutConfig(attempt=timeouts.attempt, first_byte=timeouts.first_byte))
    )
    return compose(strategies, _transport(client, route))


def build_runtime(
    policy: Policy, source: str, resources: Resources, base_dir: Path | None = None
) -> RuntimePolicy:
    default_upstream = policy.default_upstream or next(iter(policy.upstreams))
    routes = []
    for route in policy.routes:
        upstream_name = route.upstream or default_upstream
        routes.append(
            RouteRuntime(
                name=route.name,
                path_prefix=route.match.path_prefix,
                methods=frozenset(route.match.methods) if route.match.methods else None,
                upstream=upstream_name,
                replay_limit=route.retry.replay_limit,
                handler=_route_pipeline(
                    route, upstream_name, resources, policy, base_dir or Path.cwd()
                ),
                policy=route,
            )
        )
    return RuntimePolicy(policy=policy, source=source, routes=tuple(routes))
