"""Per-attempt timeouts: until response headers (`attempt_timeout`) and from headers to the first
body byte or first SSE `data:` event (`first_byte_timeout`).

Sits innermost, just outside the transport and inside the breaker, so a timeout trips the breaker.
When what is left of the request's deadline is shorter than the timeout, the deadline wins and the
failure is `deadline_exceeded`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.pipeline import Handler, ProxyRequest, ProxyResponse

__all__ = ["TimeoutConfig", "TimeoutStrategy"]


@dataclass(frozen=True)
class TimeoutConfig:
    attempt: float
    first_byte: float | None = None


def _limit(configured: float, ctx: RequestContext) -> tuple[float, bool]:
    remaining = ctx.remaining()
    if remaining is not None and remaining < configured:
        return max(remaining, 0.0), True
    return configured, False


def _with_deadline_header(request: ProxyRequest, remaining: float) -> ProxyRequest:
    """The upstream learns how long it has: the remaining budget in `x-request-timeout`."""
    headers = [(k, v) for k, v in request.headers if k.lower() != "x-request-timeout"]
    headers.append(("x-request-timeout", f"{max(remaining, 0.001):.3f}"))
    return dataclasses.replace(request, headers=headers)


class TimeoutStrategy:
    def __init__(self, config: TimeoutConfig) -> None:
        self.config = config

    async def __call__(
        self, request: ProxyRequest, ctx: RequestContext, next: Handler
    ) -> ProxyResponse:
        limit, by_deadline = _limit(self.config.attempt, ctx)
        if by_deadline and limit <= 0:
            raise SidecarError(FailureMode.DEADLINE_EXCEEDED, "the request's deadline passed")
        remaining = ctx.remaining()
        if remaining is not None:
            request = _with_deadline_header(request, remaining)
        try:
            async with asyncio.timeout(limit) as scope:
                response = await next(request, ctx)
        except TimeoutError:
            if not scope.expired():
                raise
            if by_deadline:
                ctx.emit("deadline_exceeded", phase="headers")
                raise SidecarError(
                    FailureMode.DEADLINE_EXCEEDED,
                    "the request's deadline passed while waiting for the upstream",
                ) from None
            ctx.emit("attempt_timeout", timeout=limit, phase="headers")
            raise SidecarError(
                FailureMode.ATTEMPT_TIMEOUT,
                f"upstream sent no response headers within {limit:g}s",
            ) from None
        if self.config.first_byte is not None:
            await self._first_byte(response, ctx)
        return response

    async def _first_byte(self, response: ProxyResponse, ctx: RequestContext) -> None:
        prefetch = getattr(response.body, "prefetch", None)
        if prefetch is None:
            return
        assert self.config.first_byte is not None
        limit, by_deadline = _limit(self.config.first_byte, ctx)
        started = ctx.clock.monotonic()
        try:
            async with asyncio.timeout(limit) as scope:
                await prefetch()
        except TimeoutError:
            response.body.close()
            if not scope.expired():
                raise
            if by_deadline:
                ctx.emit("deadline_exceeded", phase="first_byte")
                raise SidecarError(
                    FailureMode.DEADLINE_EXCEEDED,
                    "the request's deadline passed while waiting for the first byte",
                ) from None
            ctx.emit("attempt_timeout", timeout=limit, phase="first_byte")
            raise SidecarError(
                FailureMode.FIRST_BYTE_TIMEOUT,
                f"upstream sent headers but no body within {limit:g}s",
            ) from None
        except BaseException:
            response.body.close()
            raise
        ctx.first_byte_seconds = ctx.clock.monotonic() - started
