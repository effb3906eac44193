"""Retries with tenacity, under a retry budget, before any byte reached the caller.

Sits inside the total deadline and outside the breaker, so every attempt is counted by the breaker
and an open circuit (`circuit_open`) is never retried. What is retried: connect errors and
429/503 always; attempt and first-byte timeouts, other 5xx and invalid output only on routes
marked idempotent (a retried inference costs GPU time). Backoff is exponential with full jitter;
`Retry-After` is honoured, capped by the deadline.

The retry condition is a chain of small predicates, the budget last, so a token is spent only when
a retry will really happen (tenacity evaluates `retry` before `stop`, so the predicates also hold
the attempt limit). Deadline-aware: no attempt starts when what is left of the deadline is shorter
than the upstream's recent median latency.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, stop_never
from tenacity.retry import retry_base

from sidecar.classify import classify_error, classify_status
from sidecar.context import RequestContext
from sidecar.errors import FailureMode
from sidecar.pipeline import Handler, ProxyRequest, ProxyResponse
from sidecar.strategies.budget import RetryBudget
from sidecar.strategies.latency import LatencyTracker

__all__ = ["RetryConfig", "RetryStrategy", "parse_retry_after"]

_ALWAYS = frozenset({FailureMode.CONNECT_ERROR, FailureMode.UPSTREAM_RATE_LIMITED})
_IDEMPOTENT_ONLY = frozenset(
    {
        FailureMode.ATTEMPT_TIMEOUT,
        FailureMode.FIRST_BYTE_TIMEOUT,
        FailureMode.UPSTREAM_5XX,
        FailureMode.INVALID_OUTPUT,
        FailureMode.STREAM_INTERRUPTED,
        FailureMode.STREAM_STALLED,
    }
)


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 3
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    idempotent: bool = False
    honour_retry_after: bool = True


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds form; an HTTP date is ignored)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds < 86400 else None


def _outcome_mode(state: RetryCallState) -> tuple[FailureMode | None, int | None]:
    outcome = state.outcome
    assert outcome is not None
    if outcome.failed:
        exc = outcome.exception()
        assert exc is not None
        return classify_error(exc), None
    response: ProxyResponse = outcome.result()
    return classify_status(response.status), response.status


class _Predicate(retry_base):
    def __init__(self, fn: Callable[[RetryCallState], bool]) -> None:
        self.fn = fn

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.fn(retry_state)


class RetryStrategy:
    def __init__(
        self,
        config: RetryConfig,
        budget: RetryBudget | None = None,
        latency: LatencyTracker | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.budget = budget
        self.latency = latency
        self.rng = rng or random.Random()

    def _retryable_mode(self, state: RetryCallState) -> bool:
        mode, status = _outcome_mode(state)
        if mode in _ALWAYS:
            return True
        if mode == FailureMode.UPSTREAM_5XX and status == 503:
            return True
        return self.config.idempotent and mode in _IDEMPOTENT_ONLY

    def _delay(self, state: RetryCallState) -> float:
        ceiling = min(
            self.config.backoff_max, self.config.backoff_base * (2 ** (state.attempt_number - 1))
        )
        delay = self.rng.uniform(0, ceiling)
        outcome = state.outcome
        if self.config.honour_retry_after and outcome is not None and not outcome.failed:
            asked = parse_retry_after(outcome.result().header("Retry-After"))
            if asked is not None:
                delay = max(delay, asked)
        return delay

    async def __call__(
        self, request: ProxyRequest, ctx: RequestContext, next: Handler
    ) -> ProxyResponse:
        if self.budget is not None:
            self.budget.deposit()
        # The first attempt runs without tenacity: most requests succeed at once, and building a
        # retrying controller for each costs more than the rest of this strategy. Its outcome is
        # handed to tenacity as attempt 1 when it was not a success.
        try:
            first: ProxyResponse | Exception = await self._attempt(request, ctx, next)
        except Exception as exc:  # handed to tenacity, which decides whether to retry it
            first = exc
        if isinstance(first, ProxyResponse) and classify_status(first.status) is None:
            return first
        return await self._retry(first, request, ctx, next)

    async def _retry(
        self,
        first: ProxyResponse | Exception,
        request: ProxyRequest,
        ctx: RequestContext,
        next: Handler,
    ) -> ProxyResponse:
        config = self.config
        planned: dict[str, float] = {}

        def attempts_left(state: RetryCallState) -> bool:
            return state.attempt_number < config.max_attempts

        def body_replayable(state: RetryCallState) -> bool:
            if request.body.replayable:
                return True
            ctx.emit("retry_skipped", reason="body_not_replayable")
            return False

        def nothing_sent(state: RetryCallState) -> bool:
            return not ctx.response_started

        def deadline_allows(state: RetryCallState) -> bool:
            delay = self._delay(state)
            planned["delay"] = delay
            remaining = ctx.remaining()
            if remaining is None:
                return True
            median = self.latency.median() if self.latency is not None else None
            needed = delay + (median or 0.0)
            if remaining <= needed:
                ctx.emit(
                    "retry_skipped",
                    reason="deadline",
                    remaining=round(remaining, 4),
                    needed=round(needed, 4),
                )
                ctx.extra["retry_skipped_deadline"] = True
                return False
            return True

        def budget_allows(state: RetryCallState) -> bool:
            if self.budget is None or self.budget.try_withdraw():
                return True
            ctx.budget_refused = True
            mode, _ = _outcome_mode(state)
            ctx.emit("budget_refused", attempt=state.attempt_number, mode=str(mode))
            return False

        predicates = [
            _Predicate(self._retryable_mode),
            _Predicate(attempts_left),
            _Predicate(nothing_sent),
            _Predicate(body_replayable),
            _Predicate(deadline_allows),
            _Predicate(budget_allows),
        ]
        condition: Any = predicates[0]
        for p in predicates[1:]:
            condition = condition & p

        def wait(state: RetryCallState) -> float:
            return planned.get("delay", 0.0)

        def before_sleep(state: RetryCallState) -> None:
            outcome = state.outcome
            assert outcome is not None
            mode, status = _outcome_mode(state)
            if not outcome.failed:
                outcome.result().body.close()
            ctx.retries += 1
            ctx.emit(
                "retry",
                attempt=state.attempt_number + 1,
                delay=round(planned.get("delay", 0.0), 4),
                reason=str(mode),
                status=status,
            )

        def give_up(state: RetryCallState) -> ProxyResponse:
            outcome = state.outcome
            assert outcome is not None
            result: ProxyResponse = outcome.result()  # re-raises a failed attempt's error
            return result

        retrying = AsyncRetrying(
            stop=stop_never,
            wait=wait,
            retry=condition,
            sleep=ctx.clock.sleep,
            before_sleep=before_sleep,
            retry_error_callback=give_up,
            reraise=True,
        )
        pending: list[ProxyResponse | Exception] = [first]

        async def attempt(
            request: ProxyRequest, ctx: RequestContext, next: Handler
        ) -> ProxyResponse:
            if pending:
                outcome = pending.pop()
                if isinstance(outcome, Exception):
                    raise outcome
                return outcome
            return await self._attempt(request, ctx, next)

        response: ProxyResponse = await retrying(attempt, request, ctx, next)
        mode = classify_status(response.status)
        if mode is not None:
            ctx.failure_mode = mode
        return response

    async def _attempt(
        self, request: ProxyRequest, ctx: RequestContext, next: Handler
    ) -> ProxyResponse:
        started = ctx.clock.monotonic()
        response = await next(request, ctx)
        if self.latency is not None and classify_status(response.status) is None:
            self.latency.record(ctx.clock.monotonic() - started)
        return response
