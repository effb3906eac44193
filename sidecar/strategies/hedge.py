"""Hedged requests: when an attempt has not answered after a delay, send another; the first good
answer wins.

Sits inside retry and outside the breaker (`Retry(+budget, +hedge) → Breaker → AttemptTimeout →
Transport`): every hedge is an attempt of its own through the breaker and the attempt timeout
(its own `ctx.attempts` number and attempt span), and a hedged round that fails as a whole is
judged by retry like a single attempt. Only for idempotent routes (the policy loader enforces
it) and replayable request bodies.

The delay is fixed, or a quantile (`p95`) of the upstream's recent latency from the
`LatencyTracker` that retry feeds (no samples yet: no hedge). Each hedge withdraws a token from
the route's retry budget; without one there is no hedge (`budget_refused` and `hedge_skipped`),
so hedges can never add more load than retries may. Nor is there one while the breaker is not
closed (half-open admits only its probes) or when the body cannot be replayed (`hedge_skipped`).

The first good answer (any status that is not an availability failure) wins. The attempts still
running are cancelled with `HEDGE_LOST` as the cancellation message: the breaker ignores a
cancellation, and telemetry ends that attempt's span as `client_cancelled`. Every answer that
lost has its body closed, so its connection goes back to the pool or is dropped. A failed
attempt does not end the round while another is in flight; when none is, the last failure is
returned (or raised) for retry to judge.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from sidecar.classify import classify_status
from sidecar.context import RequestContext
from sidecar.pipeline import Handler, ProxyRequest, ProxyResponse
from sidecar.strategies.breaker import State
from sidecar.strategies.budget import RetryBudget
from sidecar.strategies.latency import LatencyTracker

__all__ = ["HEDGE_LOST", "HedgeConfig", "HedgeStrategy"]

#: The cancellation message of an attempt that lost the race (telemetry reads it).
HEDGE_LOST = "sidecar.hedge_lost"

_Attempt = asyncio.Task[ProxyResponse]


@dataclass(frozen=True)
class HedgeConfig:
    #: Seconds to wait for an answer before hedging (used when `quantile` is None).
    delay: float = 0.05
    #: When set (0.95 for `p95`), the delay is this quantile of the upstream's recent latency.
    quantile: float | None = None
    max_hedges: int = 1
    #: Floor of a quantile-based delay, so a very fast upstream is not hedged at once.
    min_delay: float = 0.001


def _good(task: _Attempt) -> bool:
    """An attempt that answered with something other than an availability failure."""
    if task.cancelled() or task.exception() is not None:
        return False
    return classify_status(task.result().status) is None


def _close(task: _Attempt | None) -> None:
    """Close the body of an answer that will not go to the caller."""
    if task is not None and task.done() and not task.cancelled() and task.exception() is None:
        task.result().body.close()


class HedgeStrategy:
    def __init__(
        self,
        config: HedgeConfig,
        budget: RetryBudget | None = None,
        latency: LatencyTracker | None = None,
    ) -> None:
        self.config = config
        self.budget = budget
        self.latency = latency

    def delay(self) -> float | None:
        """Seconds before the first hedge, or None when there is nothing to base it on."""
        config = self.config
        if config.quantile is None:
            return config.delay
        seen = self.latency.quantile(config.quantile) if self.latency is not None else None
        return None if seen is None else max(seen, config.min_delay)

    async def __call__(
        self, request: ProxyRequest, ctx: RequestContext, next: Handler
    ) -> ProxyResponse:
        delay = self.delay()
        if delay is None or self.config.max_hedges < 1:
            return await next(request, ctx)
        number: dict[_Attempt, int] = {}

        def start() -> _Attempt:
            task = asyncio.ensure_future(next(request, ctx))
            number[task] = len(number)
            return task

        running = {start()}
        failure: _Attempt | None = None
        result: _Attempt | None = None
        timer: asyncio.Future[None] | None = None
        hedges = 0
        try:
            while result is None:
                if timer is None and hedges < self.config.max_hedges:
                    timer = asyncio.ensure_future(ctx.clock.sleep(delay))
                waiting: set[asyncio.Future[Any]] = set(running)
                if timer is not None:
                    waiting.add(timer)
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(running & done, key=number.__getitem__):
                    running.discard(task)
                    if _good(task):
                        result = task
                        break
                    _close(failure)
                    failure = task
                if result is None and not running:
                    # Nothing left in flight: the round failed; retry judges the last failure.
                    result = failure
                elif result is None and timer is not None and timer.done():
                    timer = None
                    hedges += 1
                    if self._may_hedge(request, ctx):
                        ctx.emit("hedge", hedge=hedges, delay=round(delay, 4))
                        running.add(start())
                    else:
                        hedges = self.config.max_hedges  # no more hedges in this round
        finally:
            if timer is not None:
                timer.cancel()
            # Losers are cancelled as such only when another attempt won; on the caller's
            # cancellation or the deadline they are plainly cancelled (and named by that event).
            await _cancel(running, HEDGE_LOST if result is not None else None)
            if failure is not result:
                _close(failure)
        assert result is not None
        response = result.result()  # raises the failed attempt's error
        if number[result] > 0:
            ctx.emit("hedge_won", hedge=number[result])
        ctx.upstream_status = response.status
        return response

    def _may_hedge(self, request: ProxyRequest, ctx: RequestContext) -> bool:
        if not request.body.replayable:
            ctx.emit("hedge_skipped", reason="body_not_replayable")
            return False
        if ctx.breaker_state not in (None, State.CLOSED):
            # Half-open admits only its probes: a hedge would be refused, its token wasted.
            ctx.emit("hedge_skipped", reason="breaker_not_closed")
            return False
        if self.budget is not None and not self.budget.try_withdraw():
            ctx.budget_refused = True
            ctx.emit("budget_refused", kind="hedge")
            ctx.emit("hedge_skipped", reason="budget")
            return False
        return True


async def _cancel(running: set[_Attempt], message: str | None) -> None:
    """Cancel the attempts that lost and wait for them to unwind; close any answer that arrived
    while they were being cancelled."""
    if not running:
        return
    for task in running:
        task.cancel(message)
    await asyncio.wait(running)
    for task in running:
        _close(task)
