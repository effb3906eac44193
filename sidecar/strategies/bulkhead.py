"""Bulkhead: cap the requests in flight to an upstream and shed the excess early.

Sits outside the total deadline and inside the fallback (`Fallback → Bulkhead → TotalDeadline →
...`), so a shed request never spends its deadline waiting and can still get a fallback answer.
A request takes a slot for as long as the model works on it: from admission until its body has
been read to the end (or closed, or the request is over), so a long stream holds its slot.

When every slot is taken, a request waits in a bounded FIFO queue for at most `queue_timeout`;
a full queue or an expired wait sheds it with `overloaded` (503 + `Retry-After`) and a `shed`
event. Keyed per upstream (routes that share a model share its bulkhead), with per-route
overrides, and kept across policy reloads.

Optional adaptive limit (AIMD on latency, off by default): every answer slower than
`adaptive_latency`, every timeout and every 429/503 cuts the limit by `backoff_ratio`; other
answers grow it by `1/limit` (about one slot per limit's worth of answers), between
`min_in_flight` and `max_in_flight`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from sidecar.clock import Clock
from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.pipeline import Handler, ProxyRequest, ProxyResponse, ResponseBody, read_up_to

__all__ = ["Bulkhead", "BulkheadConfig", "BulkheadStrategy", "Permit"]

#: Failures that say the upstream is congested (the adaptive limit shrinks on them).
_CONGESTION = frozenset(
    {
        FailureMode.ATTEMPT_TIMEOUT,
        FailureMode.FIRST_BYTE_TIMEOUT,
        FailureMode.DEADLINE_EXCEEDED,
        FailureMode.UPSTREAM_RATE_LIMITED,
    }
)


@dataclass(frozen=True)
class BulkheadConfig:
    max_in_flight: int = 64
    queue: int = 32
    queue_timeout: float = 0.1
    retry_after: float = 1.0
    adaptive: bool = False
    adaptive_latency: float = 1.0
    min_in_flight: int = 1
    backoff_ratio: float = 0.9


class Permit:
    """One admitted request's slot; `release` is idempotent."""

    def __init__(self, bulkhead: Bulkhead) -> None:
        self._bulkhead = bulkhead
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._bulkhead._release()


class Bulkhead:
    """The slots and queue of one upstream (or `upstream@route` override)."""

    def __init__(self, name: str, config: BulkheadConfig, clock: Clock) -> None:
        self.name = name
        self.clock = clock
        self.config = config
        self.limit = float(config.max_in_flight)
        self.in_flight = 0
        self.shed_count = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def current_limit(self) -> int:
        return max(self.config.min_in_flight, math.floor(self.limit))

    def reconfigure(self, config: BulkheadConfig) -> None:
        """A reloaded policy changed the limits: keep the requests in flight, apply the rest."""
        self.config = config
        if not config.adaptive:
            self.limit = float(config.max_in_flight)
        else:
            self.limit = min(max(self.limit, config.min_in_flight), config.max_in_flight)
        self._wake()

    # -- admission -------------------------------------------------------------------------------
    async def acquire(self, ctx: RequestContext) -> Permit:
        """Take a slot, waiting in the queue if allowed; raise `overloaded` when shed."""
        if self.in_flight < self.current_limit() and not self._waiters:
            self.in_flight += 1
            return Permit(self)
        config = self.config
        if config.queue <= 0 or config.queue_timeout <= 0:
            raise self._shed(ctx, "limit")
        if self.queued >= config.queue:
            raise self._shed(ctx, "queue_full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        timer = asyncio.ensure_future(self.clock.sleep(config.queue_timeout))
        try:
            await asyncio.wait((waiter, timer), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot we will never use
            waiter.cancel()
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        if waiter.done() and not waiter.cancelled():
            # Handed a slot (possibly just as the wait expired: take it all the same).
            return Permit(self)
        waiter.cancel()
        raise self._shed(ctx, "queue_timeout")

    def _shed(self, ctx: RequestContext, reason: str) -> SidecarError:
        self.shed_count += 1
        ctx.emit(
            "shed",
            upstream=self.name,
            reason=reason,
            in_flight=self.in_flight,
            limit=self.current_limit(),
            queued=self.queued,
        )
        return SidecarError(
            FailureMode.OVERLOADED,
            f"upstream {self.name!r} is at its concurrency limit "
            f"({self.current_limit()} in flight, {self.config.queue} queued); request shed",
            retry_after=self.config.retry_after,
        )

    def _release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self._wake()

    def _wake(self) -> None:
        """Hand free slots to the oldest waiters (the slot passes directly: no barging)."""
        while self._waiters and self.in_flight < self.current_limit():
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self.in_flight += 1
            waiter.set_result(None)

    # -- adaptive limit --------------------------------------------------------------------------
    def observe(self, latency: float | None, congested: bool) -> None:
        """Feed one answer's latency (time to response headers) into the AIMD limit."""
        config = self.config
        if not config.adaptive:
            return
        if congested or (latency is not None and latency > config.adaptive_latency):
            self.limit = max(float(config.min_in_flight), self.limit * config.backoff_ratio)
        else:
            self.limit = min(float(config.max_in_flight), self.limit + 1.0 / max(self.limit, 1.0))
            self._wake()

    def snapshot(self) -> dict[str, Any]:
        return {
            "upstream": self.name,
            "limit": self.current_limit(),
            "max_in_flight": self.config.max_in_flight,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "queue": self.config.queue,
            "adaptive": self.config.adaptive,
            "shed": self.shed_count,
        }


class _ReleasingBody:
    """Passes the body through and frees the slot once it is read to the end, fails or closes."""

    def __init__(self, inner: ResponseBody, permit: Permit) -> None:
        self._inner = inner
        self._permit = permit
        self._buffer: list[bytes] = []

    async def read_chunk(self) -> bytes:
        if self._buffer:
            return self._buffer.pop(0)
        try:
            chunk = await self._inner.read_chunk()
        except BaseException:
            self._permit.release()
            raise
        if not chunk:
            self._permit.release()
        return chunk

    async def read_all(self, limit: int) -> bytes | None:
        """Everything up to `limit` bytes; None (and the rest left unread) when over it."""
        parts, over = await read_up_to(self, limit)
        if over:
            self._buffer[:0] = parts
            return None
        return b"".join(parts)

    def close(self) -> None:
        self._permit.release()
        self._inner.close()


class BulkheadStrategy:
    def __init__(self, bulkhead: Bulkhead) -> None:
        self.bulkhead = bulkhead

    async def __call__(
        self, request: ProxyRequest, ctx: RequestContext, next: Handler
    ) -> ProxyResponse:
        bulkhead = self.bulkhead
        permit = await bulkhead.acquire(ctx)
        # Whatever happens to the body, the slot is free when the request is over.
        ctx.finish_hooks.append(lambda _ctx: permit.release())
        started = ctx.clock.monotonic()
        try:
            response = await next(request, ctx)
        except SidecarError as err:
            permit.release()
            bulkhead.observe(None, congested=err.mode in _CONGESTION)
            raise
        except BaseException:
            permit.release()
            raise
        bulkhead.observe(ctx.clock.monotonic() - started, congested=response.status in (429, 503))
        response.body = _ReleasingBody(response.body, permit)
        return response
