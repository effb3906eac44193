"""The app's state, kept in a typed `web.AppKey` (no module-level mutable state)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sidecar.clock import Clock, MonotonicClock
from sidecar.failures.capture import FailureRecorder
from sidecar.policy.builder import RuntimePolicy
from sidecar.policy.schema import UpstreamPolicy
from sidecar.review.desk import ReviewDesk
from sidecar.strategies.breaker import BreakerConfig, CircuitBreaker, TransitionListener
from sidecar.strategies.budget import RetryBudget, RetryBudgetConfig
from sidecar.strategies.bulkhead import Bulkhead, BulkheadConfig
from sidecar.strategies.last_known_good import CacheConfig, LastKnownGood
from sidecar.strategies.latency import LatencyTracker
from sidecar.telemetry.events import Telemetry
from sidecar.telemetry.logging import get_logger
from sidecar.telemetry.metrics import Metrics
from sidecar.transport.breaker_sync import BreakerSync
from sidecar.transport.client import UpstreamClient

__all__ = ["STATE", "SidecarState"]


@dataclass
class SidecarState:
    runtime: RuntimePolicy | None = None
    clock: Clock = field(default_factory=MonotonicClock)
    clients: dict[str, UpstreamClient] = field(default_factory=dict)
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    #: Added to every breaker created (metrics and alerts watch transitions).
    breaker_listeners: list[TransitionListener] = field(default_factory=list)
    #: Breaker state shared across replicas (`breaker.storage`); see `shared_breakers()`.
    breaker_sync: BreakerSync | None = None
    #: Prometheus metrics (`/metrics`); the review queue reports its backlog here too.
    metrics: Metrics = field(default_factory=Metrics)
    #: Tracing, the event sink, alerts; created by the app (`sidecar.app.Sidecar`).
    telemetry: Telemetry | None = None
    #: The human review queue; see `review_queue()`.
    reviews: ReviewDesk | None = None
    #: Failure capture (`sidecar.failures.capture.install_failure_capture`); None in bare apps.
    failures: FailureRecorder | None = None
    budgets: dict[str, RetryBudget] = field(default_factory=dict)
    latencies: dict[str, LatencyTracker] = field(default_factory=dict)
    bulkheads: dict[str, Bulkhead] = field(default_factory=dict)
    fallback_caches: dict[str, LastKnownGood] = field(default_factory=dict)
    draining: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    admin_token: str | None = None
    reviewer_token: str | None = None
    app_token: str | None = None
    admin_loopback_only: bool = True
    log: Any = None
    #: Connection guard of the proxy listener (header deadline, connection cap).
    guard: Any = None
    #: Upstream bodies being streamed to callers; closed when the drain grace runs out.
    streams: set[Any] = field(default_factory=set)
    shutting_down: bool = False
    reloads: int = 0
    reload_failures: int = 0

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
            existing.listeners.extend(self.breaker_listeners)
            self.breakers[key] = existing
            if config.storage is not None or self.breaker_sync is not None:
                self.shared_breakers().register(existing)
        return existing

    def shared_breakers(self) -> BreakerSync:
        """Shares the state of breakers with a `storage` URL through Redis; created on first use,
        started by the app, inert while no breaker names a storage."""
        if self.breaker_sync is None:
            self.breaker_sync = BreakerSync(
                self.clock,
                log=get_logger("sidecar.breaker_sync"),
                on_error=lambda operation: self.metrics.breaker_sync_error(operation),
            )
        return self.breaker_sync

    def budget(self, route: str, config: RetryBudgetConfig) -> RetryBudget:
        existing = self.budgets.get(route)
        if existing is None or existing.config != config:
            existing = RetryBudget(config, self.clock)
            self.budgets[route] = existing
        return existing

    def latency(self, upstream: str) -> LatencyTracker:
        return self.latencies.setdefault(upstream, LatencyTracker())

    def bulkhead(self, key: str, config: BulkheadConfig) -> Bulkhead:
        """The bulkhead of an upstream (or `upstream@route` override); a reload that changes its
        limits reconfigures it in place, so requests in flight keep their slots."""
        existing = self.bulkheads.get(key)
        if existing is None:
            existing = Bulkhead(key, config, self.clock)
            self.bulkheads[key] = existing
        elif existing.config != config:
            existing.reconfigure(config)
        return existing

    def fallback_cache(self, route: str, config: CacheConfig) -> LastKnownGood:
        """A route's last-known-good answers, kept across reloads while its config is unchanged."""
        existing = self.fallback_caches.get(route)
        if existing is None or existing.config != config:
            existing = LastKnownGood(config, self.clock)
            self.fallback_caches[route] = existing
        return existing

    def request_started(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self.idle.set()

    def review_queue(self) -> ReviewDesk:
        """The human review queue: set by the app from the policy's `reviews` section, else
        created on first use from the environment (SQLite under `SIDECAR_STATE_DIR`, or
        PostgreSQL with `SIDECAR_DATABASE_URL`); its store opens lazily, so an unusable one
        fails closed per request."""
        if self.reviews is None:
            self.reviews = ReviewDesk.from_env(clock=self.clock)
            self.reviews.metrics = self.metrics
        return self.reviews

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
        if self.reviews is not None:
            await self.reviews.close()
        if self.breaker_sync is not None:
            await self.breaker_sync.close()


STATE = web.AppKey("sidecar_state", SidecarState)
