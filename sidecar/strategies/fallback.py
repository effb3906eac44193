"""Fallback: when the model cannot answer, the least harmful answer available, fast and marked.

Sits inside the confidence gate and outside the bulkhead (`ConfidenceGate → Fallback → Bulkhead →
TotalDeadline → ...`). When the inner pipeline raised an availability failure, `circuit_open`,
`overloaded` or `deadline_exceeded`, or returned a 5xx/429 answer, before any byte reached the
caller, the chain is tried in order on what is left of the deadline:

- `upstream`: another (smaller) model, through its own breaker and attempt timeout (its handler
  is built by the policy builder); a failing answer moves on down the chain;
- `cache`: the last-known-good answer to the same request from the same caller;
- `rules`: the first CEL rule over the request that holds picks a response template;
- `static`: a declared safe default, which always answers.

An answer sets `ctx.outcome = fallback` and `ctx.fallback_kind`, while `ctx.failure_mode` keeps
the original cause (so `x-sidecar-failure-mode` says why). When every link fails, the caller gets
the original failure. Each answer emits `fallback` (kind, cause, position); each link that could
not answer emits `fallback_failed` (kind, reason). `run_chain` is also what the confidence gate
calls for `on_review/on_reject: fallback`.

The cache learns from this route's own good answers: a 2xx answer's body is copied (capped) as it
streams, and stored when the request is over, the whole body was delivered and it was good: in the
gate's auto band where the route has a gate, any 2xx otherwise.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.classify import classify_status
from sidecar.context import RequestContext
from sidecar.errors import AVAILABILITY_MODES, FailureMode, SidecarError
from sidecar.outcome import Outcome
from sidecar.pipeline import BytesBody, Handler, ProxyRequest, ProxyResponse, header_value
from sidecar.strategies.deadline import caller_timeout
from sidecar.strategies.last_known_good import (
    CacheConfig,
    LastKnownGood,
    RecordingBody,
    cache_key,
)
from sidecar.strategies.rules import CelEvalError, CelPredicate

__all__ = [
    "JUDGED_KINDS",
    "TRIGGER_MODES",
    "CacheFallback",
    "FallbackConfig",
    "FallbackLink",
    "FallbackStrategy",
    "ResponseTemplate",
    "Rule",
    "RulesFallback",
    "StaticFallback",
    "UpstreamFallback",
]

#: Failures the chain answers for. Client errors, cancellations and low confidence are not
#: among them (the gate calls `run_chain` itself when its policy says so).
TRIGGER_MODES: frozenset[FailureMode] = AVAILABILITY_MODES | {
    FailureMode.CIRCUIT_OPEN,
    FailureMode.OVERLOADED,
    FailureMode.DEADLINE_EXCEEDED,
}

#: Fallback answers the confidence gate judges: a fallback model's. A cached answer already
#: passed the gate; rules and static answers are declared safe defaults.
JUDGED_KINDS: frozenset[str] = frozenset({"upstream"})

#: A failing answer this small is buffered so its connection (and bulkhead slot) is freed while
#: the chain runs; the caller still gets it byte for byte if every link fails.
_KEEP_FAILED_ANSWER = 64 * 1024


@dataclass(frozen=True)
class ResponseTemplate:
    """A response the sidecar makes up: status, headers and a JSON body (empty when none)."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    @classmethod
    def from_json(
        cls, status: int, headers: Sequence[tuple[str, str]], document: Any, has_body: bool
    ) -> ResponseTemplate:
        hdrs = list(headers)
        body = b""
        if has_body:
            body = json.dumps(document, separators=(",", ":")).encode()
            if header_value(hdrs, "content-type") is None:
                hdrs.append(("Content-Type", "application/json"))
        return cls(status=status, headers=tuple(hdrs), body=body)

    def response(self) -> ProxyResponse:
        return ProxyResponse(
            status=self.status,
            headers=list(self.headers),
            body=BytesBody(self.body),
            content_length=len(self.body),
        )


@dataclass(frozen=True)
class Rule:
    when: CelPredicate
    respond: ResponseTemplate


@dataclass(frozen=True)
class UpstreamFallback:
    """Another upstream; `handler` is its own mini pipeline (breaker, attempt timeout, ...)."""

    name: str
    handler: Handler
    kind: str = field(default="upstream", init=False)


@dataclass(frozen=True)
class CacheFallback:
    cache: LastKnownGood
    kind: str = field(default="cache", init=False)

    @property
    def config(self) -> CacheConfig:
        return self.cache.config


@dataclass(frozen=True)
class RulesFallback:
    rules: tuple[Rule, ...]
    kind: str = field(default="rules", init=False)


@dataclass(frozen=True)
class StaticFallback:
    template: ResponseTemplate
    kind: str = field(default="static", init=False)


FallbackLink = UpstreamFallback | CacheFallback | RulesFallback | StaticFallback


@dataclass(frozen=True)
class FallbackConfig:
    route: str
    #: The route's total deadline: the chain's budget when the failure came before the deadline
    #: was set (a shed request).
    total: float
    #: The route has a confidence gate: the cache stores only answers in its auto band.
    gated: bool = False


class _Skip(Exception):
    """A link that cannot answer this request (a miss, no body, no time)."""

    def __init__(self, reason: str, **attrs: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attrs = attrs


class FallbackStrategy:
    def __init__(self, config: FallbackConfig, chain: Sequence[FallbackLink]) -> None:
        self.config = config
        self.chain = tuple(chain)
        self._cache = next((link for link in self.chain if isinstance(link, CacheFallback)), None)

    async def __call__(
        self, request: ProxyRequest, ctx: RequestContext, next: Handler
    ) -> ProxyResponse:
        try:
            response = await next(request, ctx)
        except SidecarError as err:
            if err.mode not in TRIGGER_MODES or ctx.response_started or not self.chain:
                raise
            answer = await self._run(request, ctx, err)
            if answer is None:
                raise
            return answer
        mode = classify_status(response.status)
        if mode is None:
            self._learn(request, ctx, response)
            return response
        if ctx.response_started or not self.chain:
            return response
        response = await _buffer_small(response)
        cause = SidecarError(mode, f"upstream answered {response.status}", status=response.status)
        answer = await self._run(request, ctx, cause)
        if answer is None:
            ctx.failure_mode = mode
            return response
        response.body.close()
        return answer

    async def run_chain(
        self, request: ProxyRequest, ctx: RequestContext, cause: SidecarError
    ) -> ProxyResponse:
        """Answer for `cause` from the chain; raise `cause` itself when no link answers."""
        answer = await self._run(request, ctx, cause)
        if answer is None:
            raise cause
        return answer

    # -- the chain -------------------------------------------------------------------------------
    async def _run(
        self, request: ProxyRequest, ctx: RequestContext, cause: SidecarError
    ) -> ProxyResponse | None:
        ctx.failure_mode = cause.mode
        if ctx.deadline is None:
            budget = self.config.total
            asked = caller_timeout(request)
            if asked is not None and asked < budget:
                budget = asked
            ctx.deadline = ctx.started + budget
        for position, link in enumerate(self.chain):
            try:
                response, attrs = await self._try(link, request, ctx, cause)
            except _Skip as skip:
                ctx.emit(
                    "fallback_failed",
                    kind=link.kind,
                    position=position,
                    reason=skip.reason,
                    **skip.attrs,
                )
                continue
            except SidecarError as err:
                ctx.emit(
                    "fallback_failed", kind=link.kind, position=position, reason=err.mode.value
                )
                continue
            finally:
                ctx.failure_mode = cause.mode
            ctx.fallback_kind = link.kind
            ctx.outcome = Outcome.FALLBACK
            ctx.emit("fallback", kind=link.kind, cause=cause.mode.value, position=position, **attrs)
            return response
        return None

    async def _try(
        self, link: FallbackLink, request: ProxyRequest, ctx: RequestContext, cause: SidecarError
    ) -> tuple[ProxyResponse, dict[str, Any]]:
        if isinstance(link, StaticFallback):
            return link.template.response(), {}
        if isinstance(link, RulesFallback):
            return self._rules(link, request, ctx)
        if isinstance(link, CacheFallback):
            return self._cached(link, request, ctx)
        return await self._upstream(link, request, ctx)

    async def _upstream(
        self, link: UpstreamFallback, request: ProxyRequest, ctx: RequestContext
    ) -> tuple[ProxyResponse, dict[str, Any]]:
        if request.body.sent and not request.body.replayable:
            raise _Skip("body_not_replayable", upstream=link.name)
        remaining = ctx.remaining()
        if remaining is not None and remaining <= 0:
            raise _Skip("deadline", upstream=link.name)
        breaker_state = ctx.breaker_state
        try:
            async with asyncio.timeout(remaining) as scope:
                response = await link.handler(request, ctx)
        except TimeoutError:
            if not scope.expired():
                raise
            raise _Skip("deadline", upstream=link.name) from None
        finally:
            # The access log keeps the primary upstream's breaker state.
            ctx.breaker_state = breaker_state
        mode = classify_status(response.status)
        if mode is not None:
            response.body.close()
            raise _Skip(mode.value, upstream=link.name, status=response.status)
        return response, {"upstream": link.name}

    def _cached(
        self, link: CacheFallback, request: ProxyRequest, ctx: RequestContext
    ) -> tuple[ProxyResponse, dict[str, Any]]:
        key = cache_key(self.config.route, request, link.config.key_headers)
        if key is None:
            raise _Skip("body_not_replayable")
        entry = link.cache.get(key)
        if entry is None:
            raise _Skip("miss")
        age = max(0, int(ctx.clock.monotonic() - entry.stored_at))
        response = ProxyResponse(
            status=entry.status,
            headers=[*entry.headers, ("Age", str(age))],
            body=BytesBody(entry.body),
            content_length=len(entry.body),
        )
        return response, {"age": age}

    def _rules(
        self, link: RulesFallback, request: ProxyRequest, ctx: RequestContext
    ) -> tuple[ProxyResponse, dict[str, Any]]:
        activation = _activation(request)
        errors = 0
        for index, rule in enumerate(link.rules):
            try:
                if rule.when.matches(activation):
                    return rule.respond.response(), {"rule": index}
            except CelEvalError:
                errors += 1
        raise _Skip("no_rule_matched", rule_errors=errors)

    # -- learning good answers for the cache ---------------------------------------------------
    def _learn(self, request: ProxyRequest, ctx: RequestContext, response: ProxyResponse) -> None:
        cache_link = self._cache
        if cache_link is None or not 200 <= response.status < 300:
            return
        key = cache_key(self.config.route, request, cache_link.config.key_headers)
        if key is None:
            return
        recording = RecordingBody(response.body, cache_link.config.max_body)
        response.body = recording
        status, headers, gated = response.status, list(response.headers), self.config.gated

        def store(ctx: RequestContext) -> None:
            if ctx.failure_mode is not None or ctx.fallback_kind is not None:
                return
            if ctx.outcome not in (None, Outcome.OK, Outcome.RETRIED):
                return
            if gated and ctx.confidence_band != "auto":
                return
            if recording.too_large:
                ctx.emit("cache_store_skipped", reason="too_large")
                return
            data = recording.data
            if data is None:
                return
            cache_link.cache.put(key, status, headers, data)

        ctx.finish_hooks.append(store)


def _activation(request: ProxyRequest) -> dict[str, Any]:
    data = request.body.data
    if data is None:
        raise _Skip("body_not_replayable")
    document: Any = None
    if data.strip():
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            document = None
    headers: dict[str, str] = {}
    for name, value in request.headers:
        lname = name.lower()
        headers[lname] = f"{headers[lname]}, {value}" if lname in headers else value
    return {
        "request": document,
        "method": request.method,
        "path": request.path_qs.split("?", 1)[0],
        "headers": headers,
    }


async def _buffer_small(response: ProxyResponse) -> ProxyResponse:
    read_all = getattr(response.body, "read_all", None)
    if read_all is None:
        return response
    try:
        data = await read_all(_KEEP_FAILED_ANSWER)
    except SidecarError:
        data = b""  # the failing answer broke off too: nothing of it can be passed on
    if data is None:
        return response
    response.body.close()
    response.body = BytesBody(data)
    response.content_length = len(data)
    return response
