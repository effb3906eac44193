"""The review desk: the one object between the review store and its two users.

The confidence gate submits items and waits for decisions (`hold`); the reviewer API lists,
claims and resolves them. The desk adds what the store does not know about: capability status
URLs, waking a held request the moment its item is resolved in this process (and polling, for an
item resolved by another replica sharing the store), the webhook sender (woken when an item is
queued or resolved here), and counters for telemetry. One desk lives in the app's
`SidecarState`; nothing here is module-level.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sidecar.clock import Clock, MonotonicClock
from sidecar.review.capability import CapabilitySigner
from sidecar.review.settings import (
    DEFAULT_STATE_DIR,
    ReviewSettings,
    open_review_store,
    resolve_review_settings,
    state_dir_from_env,
)
from sidecar.review.store import (
    NewReview,
    Resolution,
    ReviewItem,
    ReviewPage,
    ReviewQuery,
    ReviewStatus,
    ReviewStore,
    ReviewStoreError,
    ReviewTicket,
)

__all__ = [
    "DEFAULT_STATE_DIR",
    "DeskCounters",
    "ReviewDesk",
    "ReviewMetrics",
    "state_dir_from_env",
]

STATUS_PATH = "/reviews/status/"


class ReviewMetrics(Protocol):
    """The part of `sidecar.telemetry.metrics.Metrics` the review queue feeds."""

    def set_review_backlog(self, pending: int, oldest_queued_at: float | None) -> None: ...

    def review_resolved(self, seconds: float, decision: str) -> None: ...


@dataclass
class DeskCounters:
    enqueued: int = 0
    duplicates: int = 0
    resolved: int = 0
    store_failures: int = 0
    by_decision: dict[str, int] = field(default_factory=dict)


class ReviewDesk:
    def __init__(
        self,
        store: ReviewStore,
        state_dir: Path,
        *,
        clock: Clock | None = None,
        lease: float = 300.0,
        base_url: str = "",
        poll_interval: float = 0.5,
    ) -> None:
        self.store = store
        self.state_dir = state_dir
        self.clock = clock or MonotonicClock()
        self.lease = lease
        #: Origin the status URLs start with: SIDECAR_PUBLIC_ADMIN_URL, else the admin
        #: listener's bound address (`default_base_url`, set by the app once it listens).
        self.base_url = base_url
        self.default_base_url = ""
        self.poll_interval = poll_interval
        self.counters = DeskCounters()
        self.metrics: ReviewMetrics | None = None
        self._signer: CapabilitySigner | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self.settings = ReviewSettings(state_dir=state_dir, lease=lease)
        #: The webhook sender (`sidecar.review.webhooks.WebhookDispatcher`) when configured.
        self.webhooks: Any = None

    @classmethod
    def from_settings(cls, settings: ReviewSettings, clock: Clock | None = None) -> ReviewDesk:
        """The desk the settings describe: SQLite under the state directory or the shared
        PostgreSQL store, and the webhook sender when a webhook URL is configured (started by
        `start()`)."""
        desk = cls(
            open_review_store(settings, clock),
            settings.state_dir,
            clock=clock,
            lease=settings.lease,
        )
        desk.settings = settings
        desk.base_url = settings.public_admin_url
        if settings.webhook is not None:
            from sidecar.review.webhooks import WebhookDispatcher

            desk.webhooks = WebhookDispatcher(desk.store, settings.webhook, clock=desk.clock)
        return desk

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, clock: Clock | None = None
    ) -> ReviewDesk:
        """The desk without a policy section: `SIDECAR_DATABASE_URL` (PostgreSQL) or SQLite
        under `SIDECAR_STATE_DIR` (default `./.sidecar`), `SIDECAR_REVIEW_RETENTION` (default
        30 days, resolved items only), `SIDECAR_REVIEW_LEASE` (default 5m),
        `SIDECAR_PUBLIC_ADMIN_URL`, `SIDECAR_WEBHOOK_URL` + `SIDECAR_WEBHOOK_SECRET`."""
        return cls.from_settings(resolve_review_settings(env), clock)

    async def start(self) -> str | None:
        """Prepare the store (PostgreSQL: apply migrations) and start the webhook sender.
        Returns the store's error when it cannot be used yet; that is not fatal: every
        operation tries again, and the gate fails closed meanwhile."""
        error = None
        try:
            migrate = getattr(self.store, "migrate", None)
            if migrate is not None:
                await migrate()
            await self.ensure_signer()
        except ReviewStoreError as exc:
            error = str(exc)
        if self.webhooks is not None:
            self.webhooks.start()
        return error

    def _changed(self) -> None:
        if self.webhooks is not None:
            self.webhooks.wake()

    # --- telemetry -----------------------------------------------------------------------

    async def refresh_backlog(self) -> None:
        """Report the backlog (pending count, oldest) to metrics; a failing store is not an
        error here (the gate counts store failures where they matter)."""
        if self.metrics is None:
            return
        try:
            pending, oldest = await self.store.backlog()
        except ReviewStoreError:
            return
        self.metrics.set_review_backlog(pending, oldest)

    # --- capability URLs -----------------------------------------------------------------

    def signer(self) -> CapabilitySigner:
        """The status URL signer; `ensure_signer()` must have loaded a key the store shares."""
        if self._signer is None:
            try:
                self._signer = CapabilitySigner.from_state_dir(self.state_dir)
            except (OSError, ValueError) as exc:
                raise ReviewStoreError(f"cannot read or create the status URL key: {exc}") from exc
        return self._signer

    async def ensure_signer(self) -> CapabilitySigner:
        """Load the key: from the store when it shares one between replicas (PostgreSQL),
        else from the state directory."""
        if self._signer is None:
            secret = await self.store.capability_secret()
            if secret is not None:
                self._signer = CapabilitySigner(secret)
        return self.signer()

    def status_url(self, review_id: str) -> str:
        base = self.base_url or self.default_base_url
        return f"{base}{STATUS_PATH}{self.signer().token(review_id)}"

    def verify(self, token: str) -> str | None:
        try:
            return self.signer().verify(token)
        except ReviewStoreError:
            return None

    # --- the gate's side -----------------------------------------------------------------

    async def submit(self, review: NewReview) -> ReviewTicket:
        """Queue an item; returns only after the store committed it. Raises
        `ReviewStoreError` (counted) when the item could not be stored."""
        try:
            # Before the commit, so a queued item never lacks its status URL.
            await self.ensure_signer()
            result = await self.store.enqueue(review)
        except ReviewStoreError:
            self.counters.store_failures += 1
            raise
        if result.created:
            self.counters.enqueued += 1
            self._changed()
            await self.refresh_backlog()
        else:
            self.counters.duplicates += 1
        return ReviewTicket(
            review_id=result.item.id,
            status_url=self.status_url(result.item.id),
            created=result.created,
        )

    async def wait_decision(self, review_id: str, timeout: float) -> ReviewItem | None:
        """The resolved item once a reviewer decided, or None after `timeout` seconds."""
        event = asyncio.Event()
        self._waiters.setdefault(review_id, set()).add(event)
        deadline = self.clock.monotonic() + timeout
        try:
            while True:
                item = await self.store.get(review_id)
                if item is not None and item.status is ReviewStatus.RESOLVED:
                    return item
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0:
                    return None
                try:
                    async with asyncio.timeout(min(remaining, self.poll_interval)):
                        await event.wait()
                except TimeoutError:
                    pass
                event.clear()
        finally:
            waiters = self._waiters.get(review_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[review_id]

    # --- the reviewers' side -------------------------------------------------------------

    async def get(self, review_id: str) -> ReviewItem | None:
        await self.ensure_signer()
        return await self.store.get(review_id)

    async def list(self, query: ReviewQuery) -> ReviewPage:
        return await self.store.list(query)

    async def claim(self, review_id: str, reviewer: str, lease: float | None = None) -> ReviewItem:
        await self.ensure_signer()
        return await self.store.claim(review_id, reviewer, self.lease if lease is None else lease)

    async def claim_next(
        self, reviewer: str, route: str | None = None, lease: float | None = None
    ) -> ReviewItem | None:
        await self.ensure_signer()
        return await self.store.claim_next(reviewer, self.lease if lease is None else lease, route)

    async def resolve(self, review_id: str, resolution: Resolution) -> ReviewItem:
        await self.ensure_signer()
        item = await self.store.resolve(review_id, resolution)
        self.counters.resolved += 1
        self._changed()
        decision = resolution.decision.value
        self.counters.by_decision[decision] = self.counters.by_decision.get(decision, 0) + 1
        for event in self._waiters.get(review_id, ()):
            event.set()
        if self.metrics is not None and item.resolved_at is not None:
            self.metrics.review_resolved(item.resolved_at - item.created_at, decision)
        await self.refresh_backlog()
        return item

    async def close(self) -> None:
        if self.webhooks is not None:
            await self.webhooks.stop()
        await self.store.close()
