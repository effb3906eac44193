"""The app's state, kept in a typed `web.AppKey` (no module-level mutable state)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sidecar.clock import Clock, MonotonicClock
from sidecar.policy.builder import RuntimePolicy
from sidecar.policy.schema import UpstreamPolicy
from sidecar.strategies.breaker import BreakerConfig, CircuitBreaker
from sidecar.strategies.budget import RetryBudget, RetryBudgetConfig
from sidecar.strategies.latency import LatencyTracker
from sidecar.transport.client import UpstreamClient

__all__ = ["STATE", "SidecarState"]


@dataclass
class SidecarState:
    runtime: RuntimePolicy | None = None
    clock: Clock = field(default_factory=MonotonicClock)
    clients: dict[str, UpstreamClient] = field(default_factory=dict)
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    budgets: dict[str, RetryBudget] = field(default_factory=dict)
    latencies: dict[str, LatencyTracker] = field(default_factory=dict)
    draining: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    admin_token: str | None = None
    reviewer_token: str | None = None
    app_token: str | None = None
    admin_loopback_only: bool = True
    log: Any = None

    def client(self, name: str, upstream: UpstreamPolicy) -> UpstreamClient:
        """The pooled client for an upstream; kept across reloads while its URL is unchanged."""
        key = f"{name}|{upstream.url}|{upstream.pool_size}"
        existing = self.clients.get(key)
        if existing is None:
            existing = UpstreamClient(name, upstream.url, upstream.pool_size, self.clock)
            self.clients[key] = existing
        return existing

    def breaker(self, key: str, config: BreakerConfig) -> CircuitBreaker:
        """The breaker for an upstream (or `upstream@route` override); a changed config starts
        a new breaker, an unchanged one keeps its state across reloads."""
        existing = self.breakers.get(key)
        if existing is None or existing.config != config:
            existing = CircuitBreaker(key, config, self.clock)
            self.breakers[key] = existing
        return existing

    def budget(self, route: str, config: RetryBudgetConfig) -> RetryBudget:
        existing = self.budgets.get(route)
        if existing is None or existing.config != config:
            existing = RetryBudget(config, self.clock)
            self.budgets[route] = existing
        return existing

    def latency(self, upstream: str) -> LatencyTracker:
        return self.latencies.setdefault(upstream, LatencyTracker())

    def request_started(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self.idle.set()

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()


STATE = web.AppKey("sidecar_state", SidecarState)
