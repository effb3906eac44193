"""`GET /admin/status` (admin scope): what the sidecar is doing now, as one JSON document.

Per route: request rate, the shares of what callers got (success, fallback, escalated, rejected,
error), failures by mode, the route's breaker (state, time to the next probe), its retry budget,
and in-flight requests against the bulkhead's limit; then every breaker, and the review backlog
with the age of its oldest item. `sidecar status` renders it (`sidecar.status`).

Rates come from the metrics object's own counters (`sidecar_requests_total`,
`sidecar_failures_total`), never from a second set of counters on the request path. Each call
reads the cumulative totals and keeps them as a sample in a small per-app `StatusWindow`; the
rate is the difference between now and the oldest sample that is not older than the window
(60 s), divided by the time between them, and the document says how long that span was
(`window_seconds`). So while someone polls (`sidecar status --watch` every 2 s) the figures are
over the last minute; the first call after a quiet spell covers the time since the previous
call (or since start), and says so. Counters never reset within a process, so differences are
exact.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from sidecar.clock import Clock
from sidecar.outcome import Outcome
from sidecar.review.store import ReviewStoreError
from sidecar.server.state import STATE, SidecarState
from sidecar.telemetry.metrics import NO_ROUTE

__all__ = ["DEFAULT_WINDOW", "StatusWindow", "Totals", "add_status_routes", "collect_status"]

#: Seconds the rates and shares look back over while the status is polled.
DEFAULT_WINDOW = 60.0
#: Seconds a review backlog query may take before the last known figures are shown.
_BACKLOG_TIMEOUT = 1.0
_SHARES = {
    "success": (Outcome.OK, Outcome.RETRIED),
    "fallback": (Outcome.FALLBACK,),
    "escalated": (Outcome.ESCALATED,),
    "rejected": (Outcome.REJECTED,),
    "error": (Outcome.ERROR,),
}

Key = tuple[str, str]


@dataclass(frozen=True)
class Totals:
    """Cumulative counter values at one moment (monotonic seconds)."""

    at: float
    #: (route, outcome) → requests
    requests: Mapping[Key, float]
    #: (route, mode) → failures
    failures: Mapping[Key, float]


def _counter_totals(counter: Counter) -> dict[Key, float]:
    out: dict[Key, float] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                labels = list(sample.labels.values())
                if len(labels) == 2:
                    out[(labels[0], labels[1])] = sample.value
    return out


class StatusWindow:
    """Samples of the cumulative totals, kept for `window` seconds (plus the one just before)."""

    def __init__(self, clock: Clock, window: float = DEFAULT_WINDOW, max_samples: int = 512):
        self.clock = clock
        self.window = window
        self.started = clock.monotonic()
        self.started_wall = clock.wall()
        # Every counter is zero when the app starts.
        self._samples: deque[Totals] = deque([Totals(self.started, {}, {})], maxlen=max_samples)

    def observe(self, now: Totals) -> Totals:
        """Record `now` and return the baseline to compare it with: the oldest sample that is
        not older than the window, or, when none is, the newest one before it."""
        samples = self._samples
        cutoff = now.at - self.window
        while len(samples) > 1 and samples[1].at <= cutoff:
            samples.popleft()
        baseline = samples[0]
        if samples[-1].at < now.at:
            samples.append(now)
        return baseline


def _delta(now: Mapping[Key, float], before: Mapping[Key, float], key: Key) -> int:
    return max(0, round(now.get(key, 0.0) - before.get(key, 0.0)))


def _route_names(state: SidecarState, totals: Totals) -> list[str]:
    names = [r.name for r in state.runtime.routes] if state.runtime is not None else []
    if any(route == NO_ROUTE and value > 0 for (route, _), value in totals.requests.items()):
        names.append(NO_ROUTE)
    return names


def _breaker(state: SidecarState, key: str) -> dict[str, Any] | None:
    breaker = state.breakers.get(key)
    if breaker is None:
        return None
    snap = breaker.snapshot()
    return {
        "name": key,
        "state": snap["state"],
        "next_probe_in": snap["next_probe_in"],
        "consecutive_failures": snap["consecutive_failures"],
    }


def _route_status(
    state: SidecarState, name: str, now: Totals, before: Totals, span: float
) -> dict[str, Any]:
    outcomes = {o.value: _delta(now.requests, before.requests, (name, o.value)) for o in Outcome}
    window_total = sum(outcomes.values())
    total = round(sum(v for key, v in now.requests.items() if key[0] == name))
    shares = {
        share: (sum(outcomes[o.value] for o in members) / window_total if window_total else None)
        for share, members in _SHARES.items()
    }
    failures: dict[str, dict[str, int]] = {}
    for key in sorted(now.failures):
        if key[0] == name:
            failures[key[1]] = {
                "window": _delta(now.failures, before.failures, key),
                "total": round(now.failures[key]),
            }
    doc: dict[str, Any] = {
        "name": name,
        "upstream": None,
        "requests": {
            "rate_per_second": round(window_total / span, 3) if span > 0 else 0.0,
            "window": window_total,
            "total": total,
        },
        "outcomes": outcomes,
        "shares": shares,
        "failures": failures,
        "breaker": None,
        "retry_budget": None,
        "bulkhead": None,
    }
    runtime = state.runtime
    route = next((r for r in runtime.routes if r.name == name), None) if runtime else None
    if route is None:
        return doc
    doc["upstream"] = route.upstream
    override = f"{route.upstream}@{route.name}"
    doc["breaker"] = _breaker(state, override if route.policy.breaker else route.upstream)
    budget = state.budgets.get(route.name)
    if budget is not None:
        doc["retry_budget"] = {
            "available": round(budget.available(), 2),
            "withdrawn": budget.withdrawn,
            "refused": budget.refused,
        }
    bulkhead = state.bulkheads.get(override if route.policy.concurrency else route.upstream)
    if bulkhead is not None:
        snap = bulkhead.snapshot()
        doc["bulkhead"] = {
            "name": snap["upstream"],
            "in_flight": snap["in_flight"],
            "limit": snap["limit"],
            "queued": snap["queued"],
            "queue": snap["queue"],
            "shed": snap["shed"],
        }
    return doc


async def _reviews(state: SidecarState) -> dict[str, Any]:
    store = "not configured"
    desk = state.reviews
    if desk is not None:
        # The gauges are refreshed when items are queued or resolved here; another replica
        # sharing the store may have changed the backlog since, so ask the store (bounded).
        try:
            async with asyncio.timeout(_BACKLOG_TIMEOUT):
                pending, oldest = await desk.store.backlog()
            state.metrics.set_review_backlog(pending, oldest)
            store = "ok"
        except TimeoutError:
            store = f"no answer within {_BACKLOG_TIMEOUT:g}s (showing the last known backlog)"
        except ReviewStoreError as exc:
            store = f"unavailable: {exc} (showing the last known backlog)"
    pending, oldest = state.metrics.review_backlog()
    age = max(0.0, state.clock.wall() - oldest) if pending and oldest is not None else None
    return {
        "pending": pending,
        "oldest_age_seconds": round(age, 3) if age is not None else None,
        "store": store,
    }


def _iso(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, tz=dt.UTC).isoformat()


async def collect_status(state: SidecarState, window: StatusWindow) -> dict[str, Any]:
    """The status document (see the module docstring)."""
    clock = state.clock
    metrics = state.metrics
    now = Totals(
        clock.monotonic(),
        _counter_totals(metrics.requests),
        _counter_totals(metrics.failures),
    )
    before = window.observe(now)
    span = now.at - before.at
    runtime = state.runtime
    routes = [_route_status(state, name, now, before, span) for name in _route_names(state, now)]
    breakers: Iterable[Any] = state.breakers.values()
    return {
        "time": _iso(clock.wall()),
        "started_at": _iso(window.started_wall),
        "uptime_seconds": round(now.at - window.started, 3),
        "window_seconds": round(span, 3),
        "policy": {
            "source": runtime.source if runtime is not None else None,
            "reloads": state.reloads,
            "reload_failures": state.reload_failures,
        },
        "draining": state.draining,
        "in_flight": state.in_flight,
        "routes": routes,
        "breakers": [b.snapshot() for b in breakers],
        "reviews": await _reviews(state),
    }


STATUS_WINDOW = web.AppKey("sidecar_status_window", StatusWindow)


def add_status_routes(app: web.Application) -> None:
    """`GET /admin/status` on the admin app (admin token scope)."""
    from sidecar.server.admin import json_response, require_scope

    app[STATUS_WINDOW] = StatusWindow(app[STATE].clock)

    @require_scope("admin")
    async def status(request: web.Request) -> web.Response:
        return json_response(await collect_status(request.app[STATE], request.app[STATUS_WINDOW]))

    app.router.add_get("/admin/status", status)
