"""Webhooks of the review queue: a background sender that delivers the outbox.

The store writes an event into its outbox in the same transaction as the change it reports (a
new item, a resolution), so the request path never waits for a receiver and an event survives a
restart. This sender, one task per app, takes due events (leased, so replicas sharing a
PostgreSQL outbox do not send the same event at the same time), POSTs each body as stored and
deletes it on a 2xx answer. The status decides: the answer's body is read only so the connection
can be reused, and a body that is slow or cut after a 2xx does not undo the delivery. Anything
else (a refused connection, no status within `timeout`, a non-2xx status) makes the event due
again after an exponential backoff with jitter; an event still undelivered after `max_age` is
dropped and logged. Delivery is at least once: a receiver that handles a request but answers
after `timeout`, or a stop or crash between its answer and the delete, means the event is sent
again, with the same event id (`X-Sidecar-Event-Id`, also the body's `id`) and the same signed
bytes, so the receiver dedupes on the id.

Every POST carries `X-Sidecar-Signature: sha256=<hex>`, the HMAC-SHA256 of the raw body under the
secret from `SIDECAR_WEBHOOK_SECRET`; receivers compare it in constant time before trusting the
body (see `signature()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random

import aiohttp

from sidecar.clock import Clock, MonotonicClock
from sidecar.review.settings import WebhookSettings
from sidecar.review.store import OutboxEvent, ReviewStore, ReviewStoreError
from sidecar.telemetry.logging import get_logger

__all__ = ["SIGNATURE_HEADER", "WebhookDispatcher", "signature", "verify_signature"]

SIGNATURE_HEADER = "X-Sidecar-Signature"
_BATCH = 10
#: Most of an answer's body read (only so its connection can be reused); the status decides.
_ANSWER_LIMIT = 64 * 1024
_EXPIRE_EVERY = 60.0
_STORE_RETRY = 1.0

log = get_logger("sidecar.webhooks")


def signature(secret: bytes, body: bytes) -> str:
    """The header value for `body`: `sha256=<hex HMAC-SHA256>`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header: str | None) -> bool:
    """What a receiver does: recompute over the raw body and compare in constant time."""
    if not header:
        return False
    return hmac.compare_digest(signature(secret, body).encode(), header.strip().encode())


class WebhookDispatcher:
    def __init__(
        self,
        store: ReviewStore,
        settings: WebhookSettings,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock or MonotonicClock()
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        #: Earliest retry this sender scheduled (wall clock), so short backoffs are kept.
        self._next_due: float | None = None
        self._in_flight: set[str] = set()
        self._last_expire: float | None = None
        self._dropped_seen = 0
        self.delivered = 0
        self.failures = 0

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sidecar-webhooks")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Events taken but not answered: due again at once (the receiver dedupes if it got one).
        now = self.clock.wall()
        for event_id in list(self._in_flight):
            with contextlib.suppress(ReviewStoreError):
                await self.store.outbox_retry(event_id, now, "interrupted by shutdown")
        self._in_flight.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            wait = self.settings.poll_interval
            try:
                await self.run_once()
            except ReviewStoreError as exc:
                log.warning("webhook_outbox_unavailable", error=str(exc))
                wait = _STORE_RETRY
            except Exception as exc:  # the sender must outlive any one bad event
                log.error("webhook_sender_error", error=repr(exc))
                wait = _STORE_RETRY
            if self._next_due is not None:
                wait = max(0.0, min(wait, self._next_due - self.clock.wall()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()

    async def run_once(self) -> int:
        """Deliver what is due now; returns how many events were delivered."""
        now = self.clock.wall()
        await self._expire(now)
        self._next_due = None
        lease = _BATCH * self.settings.timeout + 10.0
        delivered = 0
        while True:
            events = await self.store.outbox_take(now, _BATCH, lease)
            # Taken (leased) until answered: stop() makes the rest due again at once.
            self._in_flight.update(event.id for event in events)
            for event in events:
                if await self._deliver(event):
                    delivered += 1
            if len(events) < _BATCH:
                return delivered
            now = self.clock.wall()

    async def _expire(self, now: float) -> None:
        dropped = self.store.outbox_dropped
        if dropped > self._dropped_seen:
            log.warning(
                "webhook_outbox_full",
                dropped=dropped - self._dropped_seen,
                limit=self.settings.outbox_max,
            )
            self._dropped_seen = dropped
        if self._last_expire is not None and now - self._last_expire < _EXPIRE_EVERY:
            return
        self._last_expire = now
        expired = await self.store.outbox_expire(now - self.settings.max_age)
        if expired:
            log.warning("webhook_dropped", events=expired, max_age=self.settings.max_age)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            )
        return self._session

    def _backoff(self, attempt: int) -> float:
        ceiling = min(
            self.settings.backoff_max, self.settings.backoff_base * 2.0 ** min(attempt - 1, 60)
        )
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    async def _deliver(self, event: OutboxEvent) -> bool:
        body = event.payload.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "ai-resilience-sidecar-webhooks",
            SIGNATURE_HEADER: signature(self.settings.secret, body),
            "X-Sidecar-Event": event.kind,
            "X-Sidecar-Event-Id": event.id,
        }
        attempt = event.attempts + 1
        try:
            try:
                async with self._client().post(
                    self.settings.url, data=body, headers=headers, allow_redirects=False
                ) as resp:
                    status = resp.status
                    # The receiver has answered: a slow or cut body must not turn a 2xx into a
                    # retry (a duplicate). Unread rest: the connection is closed, not reused.
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        await _drain(resp)
                error = None if 200 <= status < 300 else f"HTTP {status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, error = None, f"{type(exc).__name__}: {exc}".strip(": ")
            if error is None:
                await self.store.outbox_delivered(event.id)
                self._in_flight.discard(event.id)
                self.delivered += 1
                log.info(
                    "webhook_delivered",
                    event_id=event.id,
                    kind=event.kind,
                    review_id=event.review_id,
                    attempts=attempt,
                    status=status,
                )
                return True
            delay = self._backoff(attempt)
            due = self.clock.wall() + delay
            await self.store.outbox_retry(event.id, due, error)
            self._in_flight.discard(event.id)
            self.failures += 1
            self._next_due = due if self._next_due is None else min(self._next_due, due)
            log.warning(
                "webhook_failed",
                event_id=event.id,
                kind=event.kind,
                attempts=attempt,
                error=error,
                retry_in=round(delay, 3),
            )
            return False
        except asyncio.CancelledError:
            raise  # still in flight: stop() makes it due again
        except BaseException:
            self._in_flight.discard(event.id)
            raise


async def _drain(resp: aiohttp.ClientResponse) -> None:
    left = _ANSWER_LIMIT
    while left > 0 and (chunk := await resp.content.read(left)):
        left -= len(chunk)
