"""The total deadline: one budget for every attempt and backoff of a request.

Sits outside retry. A caller may shorten it with `x-request-timeout` (seconds) or `grpc-timeout`,
never lengthen it past the policy. Attempts read `ctx.deadline` to cap themselves, and the
remaining budget is sent upstream in `x-request-timeout`.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.pipeline import Handler, ProxyRequest, ProxyResponse, header_value

__all__ = ["DeadlineConfig", "DeadlineStrategy", "caller_timeout"]

_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_GRPC = re.compile(r"^(\d{1,8})([HMSmun])$")


@dataclass(frozen=True)
class DeadlineConfig:
    total: float


def caller_timeout(request: ProxyRequest) -> float | None:
    """The deadline the caller asked for, in seconds, if it sent a valid one."""
    raw = header_value(request.headers, "x-request-timeout")
    if raw is not None:
        try:
            value = float(raw.strip())
        except ValueError:
            value = -1.0
        if value > 0 and value == value and value != float("inf"):
            return value
    raw = header_value(request.headers, "grpc-timeout")
    if raw is not None:
        match = _GRPC.match(raw.strip())
        # gRPC's TimeoutValue is a positive integer: "0S" is malformed, not "no time at all".
        if match and int(match.group(1)) > 0:
            return int(match.group(1)) * _GRPC_UNITS[match.group(2)]
    return None


class DeadlineStrategy:
    def __init__(self, config: DeadlineConfig) -> None:
        self.config = config

    async def __call__(
        self, request: ProxyRequest, ctx: RequestContext, next: Handler
    ) -> ProxyResponse:
        budget = self.config.total
        asked = caller_timeout(request)
        if asked is not None and asked < budget:
            budget = asked
        now = ctx.clock.monotonic()
        deadline = now + budget
        if ctx.deadline is None or deadline < ctx.deadline:
            ctx.deadline = deadline
        remaining = ctx.deadline - now
        try:
            async with asyncio.timeout(max(remaining, 0.0)) as scope:
                return await next(request, ctx)
        except TimeoutError:
            if not scope.expired():
                raise
            ctx.emit("deadline_exceeded", budget=budget)
            raise SidecarError(
                FailureMode.DEADLINE_EXCEEDED,
                f"no answer within the request's deadline of {budget:g}s",
            ) from None
