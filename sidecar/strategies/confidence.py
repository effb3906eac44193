"""The confidence gate: confident answers go straight through, uncertain ones take the human path.

Outermost strategy of a route (`ConfidenceGate → Fallback → Bulkhead → ...`), so it judges the
answer that would go to the caller, once. It reads the answer (capped at `max_body`), extracts a
confidence with `sidecar.strategies.confidence_extract`, and sorts it into a band:

- `auto` (confidence ≥ `auto_above`): passes; `audit_sample` of them are also queued for review,
  chosen deterministically from the request id;
- `review` (in between) and `reject` (below `reject_below`): `on_review` / `on_reject` decide;
- `missing` (no usable number, or an answer over the read cap): `on_missing` decides.

Actions: `pass`; `escalate` (queue durably, then answer `202 {review_id, status_url}`, the
model's answer, or the safe default, each with `x-sidecar-review-id`); `request_info` (`422`
whose envelope carries a `request_info` hint of the fields to send); `hold` (queue, wait up to
`hold_timeout` for a reviewer's decision and answer with it, else the safe default); `fallback`
(the route's fallback chain, whose answer is not judged again). "Queued" is said only after the
store committed; when it cannot store, the gate fails closed to the safe default (or a 503
envelope) with `x-sidecar-failure-mode: low_confidence` and a `review_store_failed` event.

Answers not judged: non-200 statuses, HEAD, and fallback answers other than a fallback model's
(a cached answer already passed the gate; rules and static answers are declared safe defaults).
SSE streams: `buffer` reads the stream (capped) and gates before the first byte; `observe`
streams through, judges and queues at the end, and tells the outcome in a closing SSE comment
(`: sidecar-outcome escalated review_id=...`), the context (log, trace) and events.
"""

from __future__ import annotations

import enum
import hashlib
import json
import zlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.outcome import Outcome
from sidecar.pipeline import BytesBody, Handler, ProxyRequest, ProxyResponse, ResponseBody
from sidecar.review.store import (
    Decision,
    NewReview,
    ReviewItem,
    ReviewQueue,
    ReviewStoreError,
    ReviewTicket,
)
from sidecar.strategies.confidence_extract import (
    Answer,
    ConfidenceMissing,
    ExtractConfig,
    SseEvents,
    build_extractor,
)
from sidecar.strategies.fallback import JUDGED_KINDS, ResponseTemplate

__all__ = [
    "Action",
    "Band",
    "ConfidenceConfig",
    "ConfidenceGate",
    "FallbackChain",
    "audit_sampled",
]


class Action(enum.StrEnum):
    PASS = "pass"
    ESCALATE = "escalate"
    REQUEST_INFO = "request_info"
    HOLD = "hold"
    FALLBACK = "fallback"


class Band(enum.StrEnum):
    AUTO = "auto"
    REVIEW = "review"
    REJECT = "reject"
    MISSING = "missing"


@dataclass(frozen=True)
class ConfidenceConfig:
    extract: ExtractConfig
    auto_above: float = 0.9
    reject_below: float = 0.5
    on_review: Action = Action.ESCALATE
    on_reject: Action = Action.ESCALATE
    on_missing: Action = Action.PASS
    #: escalate: "accepted" (202 + status URL), "answer" (the model's) or "default" (safe default).
    escalate_respond: str = "accepted"
    hold_timeout: float = 5.0
    request_info_fields: tuple[str, ...] = ()
    request_info_message: str = "the model is not confident enough; send more information"
    safe_default: ResponseTemplate | None = None
    audit_sample: float = 0.0
    #: SSE: "buffer" (gate before sending) or "observe" (judge at the end).
    stream_mode: str = "buffer"
    max_body: int = 4 * 1024 * 1024
    #: How much of a request and an answer a review item keeps.
    review_body_limit: int = 64 * 1024


@runtime_checkable
class FallbackChain(Protocol):
    """The route's fallback chain (`FallbackStrategy.run_chain`): answers for `cause`, or
    raises it when no link can."""

    async def run_chain(
        self, request: ProxyRequest, ctx: RequestContext, cause: SidecarError
    ) -> ProxyResponse: ...


def audit_sampled(request_id: str, share: float) -> bool:
    """Deterministic from the request id: a retried request is sampled the same way."""
    if share <= 0:
        return False
    if share >= 1:
        return True
    digest = hashlib.sha256(b"sidecar-audit:" + request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


class _PrefixedBody:
    """Chunks already read, then the rest of the original body."""

    def __init__(self, parts: list[bytes], rest: ResponseBody) -> None:
        self._parts = list(parts)
        self._rest = rest

    async def read_chunk(self) -> bytes:
        if self._parts:
            return self._parts.pop(0)
        return await self._rest.read_chunk()

    def close(self) -> None:
        self._parts.clear()
        self._rest.close()


async def _read_capped(body: ResponseBody, limit: int) -> tuple[bytes | None, ResponseBody]:
    """The whole body when it fits in `limit` bytes; else None and a body that still yields
    every byte (nothing is lost, nothing more is buffered)."""
    read_all = getattr(body, "read_all", None)
    if read_all is not None:
        data = await read_all(limit)
        if data is None:
            return None, body
        return data, BytesBody(data)
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await body.read_chunk()
        if not chunk:
            data = b"".join(parts)
            return data, BytesBody(data)
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return None, _PrefixedBody(parts, body)


def _decoded(data: bytes, encoding: str, limit: int) -> bytes | None:
    """The body without its content coding (gzip/deflate), for reading only; None when the
    coding is unknown, broken or inflates past `limit`."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return None
    try:
        inflater = zlib.decompressobj(47)  # gzip or zlib header, detected
        out = inflater.decompress(data, limit + 1)
    except zlib.error:
        return None
    if len(out) > limit or inflater.unconsumed_tail:
        return None
    return out


def _text(data: bytes | None, limit: int) -> tuple[str | None, bool]:
    if data is None:
        return None, False
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


class ConfidenceGate:
    def __init__(
        self,
        config: ConfidenceConfig,
        queue: ReviewQueue | None,
        fallback: FallbackChain | None = None,
    ) -> None:
        if not 0.0 <= config.reject_below <= config.auto_above <= 1.0:
            raise ValueError("need 0 <= reject_below <= auto_above <= 1")
        self.config = config
        self.extractor = build_extractor(config.extract)
        self.queue = queue
        self.fallback = fallback

    # --- judging -------------------------------------------------------------------------

    def band(self, confidence: float) -> Band:
        if confidence >= self.config.auto_above:
            return Band.AUTO
        if confidence < self.config.reject_below:
            return Band.REJECT
        return Band.REVIEW

    def action(self, band: Band) -> Action:
        if band is Band.REVIEW:
            return self.config.on_review
        if band is Band.REJECT:
            return self.config.on_reject
        if band is Band.MISSING:
            return self.config.on_missing
        return Action.PASS

    def _judge(self, ctx: RequestContext, answer: Answer) -> tuple[float | None, Band, str | None]:
        try:
            confidence = self.extractor.extract(answer)
        except ConfidenceMissing as missing:
            ctx.confidence = None
            ctx.confidence_band = Band.MISSING.value
            ctx.emit("confidence_missing", reason=missing.reason)
            return None, Band.MISSING, missing.reason
        band = self.band(confidence)
        ctx.confidence = confidence
        ctx.confidence_band = band.value
        return confidence, band, None

    @staticmethod
    def _judged(request: ProxyRequest, ctx: RequestContext, response: ProxyResponse) -> bool:
        if request.method == "HEAD" or response.status != 200:
            return False
        return ctx.fallback_kind is None or ctx.fallback_kind in JUDGED_KINDS

    # --- the strategy --------------------------------------------------------------------

    async def __call__(
        self, request: ProxyRequest, ctx: RequestContext, next: Handler
    ) -> ProxyResponse:
        response = await next(request, ctx)
        if not self._judged(request, ctx, response):
            return response
        content_type = (response.header("Content-Type") or "").lower()
        sse = "text/event-stream" in content_type
        if sse and self.config.stream_mode == "observe":
            response.body = _ObservedStream(self, request, ctx, response)
            response.content_length = None
            return response
        try:
            data, response.body = await _read_capped(response.body, self.config.max_body)
        except BaseException:
            response.body.close()
            raise
        if sse:
            events = SseEvents(self.config.max_body)
            if data is not None:
                events.feed(data)
                events.close()
            answer = Answer(response.headers, events=events.events, too_large=data is None)
        else:
            readable, unreadable = None, None
            if data is not None:
                encoding = response.header("Content-Encoding") or ""
                readable = _decoded(data, encoding, self.config.max_body)
                if readable is None:
                    unreadable = f"the answer's content coding {encoding!r} cannot be read"
            answer = Answer(
                response.headers, body=readable, too_large=data is None, unreadable=unreadable
            )
        if data is not None:
            response.content_length = len(data)
        confidence, band, missing = self._judge(ctx, answer)
        if band is Band.AUTO:
            await self._audit(request, ctx, response, data, confidence)
            return response
        action = self.action(band)
        if action is Action.PASS:
            return response
        ctx.failure_mode = FailureMode.LOW_CONFIDENCE
        return await self._act(action, band, request, ctx, response, data, confidence, missing)

    async def _act(
        self,
        action: Action,
        band: Band,
        request: ProxyRequest,
        ctx: RequestContext,
        response: ProxyResponse,
        data: bytes | None,
        confidence: float | None,
        missing: str | None,
    ) -> ProxyResponse:
        if action is Action.REQUEST_INFO:
            response.body.close()
            ctx.outcome = Outcome.REJECTED
            raise SidecarError(
                FailureMode.LOW_CONFIDENCE,
                self.config.request_info_message,
                status=422,
                details={
                    "request_info": {
                        "fields": list(self.config.request_info_fields),
                        "band": band.value,
                        "confidence": confidence,
                    }
                },
            )
        if action is Action.FALLBACK:
            return await self._fallback(band, request, ctx, response, confidence, missing)
        ticket = await self._submit(request, ctx, response, data, confidence, band, action)
        if ticket is None:
            return self._fail_closed(ctx, response)
        if action is Action.HOLD:
            return await self._hold(ctx, response, ticket)
        respond = self.config.escalate_respond
        if respond == "answer":
            return response
        response.body.close()
        if respond == "default" and self.config.safe_default is not None:
            return self.config.safe_default.response()
        return self._accepted(ticket)

    # --- actions -------------------------------------------------------------------------

    @staticmethod
    def _accepted(ticket: ReviewTicket) -> ProxyResponse:
        body = json.dumps(
            {"review_id": ticket.review_id, "status_url": ticket.status_url, "status": "pending"},
            separators=(",", ":"),
        ).encode()
        return ProxyResponse(
            status=202,
            headers=[("Content-Type", "application/json"), ("Location", ticket.status_url)],
            body=BytesBody(body),
            content_length=len(body),
        )

    def _review(
        self,
        request: ProxyRequest,
        ctx: RequestContext,
        response: ProxyResponse,
        data: bytes | None,
        confidence: float | None,
        reason: str,
        action: str,
        truncated: bool = False,
    ) -> NewReview:
        limit = self.config.review_body_limit
        request_text, request_cut = _text(request.body.data, limit)
        answer_text, answer_cut = _text(data, limit)
        answer_cut = answer_cut or truncated
        return NewReview(
            request_id=ctx.request_id,
            trace_id=ctx.trace_id,
            route=ctx.route,
            reason=reason,
            action=action,
            confidence=confidence,
            request={
                "method": request.method,
                "path": request.path_qs,
                "content_type": _header(request.headers, "content-type"),
                "body": request_text,
                "body_truncated": request_cut or request.body.data is None,
            },
            answer={
                "status": response.status,
                "content_type": response.header("Content-Type"),
                "content_encoding": response.header("Content-Encoding"),
                "body": answer_text,
                "body_truncated": answer_cut or data is None,
            },
        )

    async def _submit(
        self,
        request: ProxyRequest,
        ctx: RequestContext,
        response: ProxyResponse,
        data: bytes | None,
        confidence: float | None,
        band: Band,
        action: Action,
    ) -> ReviewTicket | None:
        review = self._review(request, ctx, response, data, confidence, band.value, action.value)
        ticket = await self._enqueue(ctx, review)
        if ticket is not None:
            ctx.review_id = ticket.review_id
            ctx.outcome = Outcome.ESCALATED
            ctx.emit("escalated", **_escalated(ticket, band, action.value, confidence))
        return ticket

    async def _enqueue(self, ctx: RequestContext, review: NewReview) -> ReviewTicket | None:
        if self.queue is None:
            ctx.emit("review_store_failed", error="no review store is configured")
            return None
        try:
            return await self.queue.submit(review)
        except ReviewStoreError as exc:
            ctx.emit("review_store_failed", error=str(exc))
            return None

    def _fail_closed(self, ctx: RequestContext, response: ProxyResponse) -> ProxyResponse:
        """The answer needed a human and could not be queued: never pass it as if it had been."""
        response.body.close()
        ctx.failure_mode = FailureMode.LOW_CONFIDENCE
        ctx.outcome = Outcome.REJECTED
        ctx.review_id = None
        if self.config.safe_default is not None:
            return self.config.safe_default.response()
        raise SidecarError(
            FailureMode.LOW_CONFIDENCE,
            "the answer needs human review and the review queue is unavailable",
            status=503,
            retry_after=1,
        )

    async def _hold(
        self, ctx: RequestContext, response: ProxyResponse, ticket: ReviewTicket
    ) -> ProxyResponse:
        assert self.queue is not None
        try:
            item = await self.queue.wait_decision(ticket.review_id, self.config.hold_timeout)
        except ReviewStoreError as exc:
            ctx.emit("review_store_failed", error=str(exc))
            item = None
        except BaseException:
            response.body.close()
            raise
        if item is None:
            ctx.emit("hold_expired", review_id=ticket.review_id)
            response.body.close()
            if self.config.safe_default is not None:
                return self.config.safe_default.response()
            return self._accepted(ticket)
        return self._decided(ctx, response, item)

    def _decided(
        self, ctx: RequestContext, response: ProxyResponse, item: ReviewItem
    ) -> ProxyResponse:
        ctx.emit("review_decided", review_id=item.id, decision=str(item.decision))
        if item.decision is Decision.APPROVE:
            return response
        response.body.close()
        if item.decision is Decision.OVERRIDE:
            body = json.dumps(item.corrected, separators=(",", ":")).encode()
            return ProxyResponse(
                status=200,
                headers=[("Content-Type", "application/json")],
                body=BytesBody(body),
                content_length=len(body),
            )
        ctx.outcome = Outcome.REJECTED
        if self.config.safe_default is not None:
            return self.config.safe_default.response()
        raise SidecarError(
            FailureMode.LOW_CONFIDENCE, "a reviewer rejected the model's answer", status=422
        )

    async def _fallback(
        self,
        band: Band,
        request: ProxyRequest,
        ctx: RequestContext,
        response: ProxyResponse,
        confidence: float | None,
        missing: str | None,
    ) -> ProxyResponse:
        response.body.close()
        what = missing or f"confidence {confidence:.4f} is in the {band.value} band"
        cause = SidecarError(FailureMode.LOW_CONFIDENCE, f"the model's answer: {what}", status=422)
        # A fallback answer that came back uncertain is not sent down the chain a second time.
        if self.fallback is not None and ctx.fallback_kind is None:
            try:
                return await self.fallback.run_chain(request, ctx, cause)
            except SidecarError:
                ctx.outcome = Outcome.REJECTED
                raise
        ctx.outcome = Outcome.REJECTED
        if self.config.safe_default is not None:
            return self.config.safe_default.response()
        raise cause

    async def _audit(
        self,
        request: ProxyRequest,
        ctx: RequestContext,
        response: ProxyResponse,
        data: bytes | None,
        confidence: float | None,
    ) -> None:
        if not audit_sampled(ctx.request_id, self.config.audit_sample):
            return
        review = self._review(request, ctx, response, data, confidence, "audit", "audit")
        ticket = await self._enqueue(ctx, review)
        if ticket is not None:
            ctx.extra["audit_review_id"] = ticket.review_id
            ctx.emit("audit_sampled", review_id=ticket.review_id)

    # --- observed streams ----------------------------------------------------------------

    async def finish_observed(
        self,
        request: ProxyRequest,
        ctx: RequestContext,
        response: ProxyResponse,
        events: SseEvents,
        raw: bytes,
        raw_cut: bool,
    ) -> bytes:
        """Judge a stream that already went to the caller; queue it if it needs a human. The
        return value is the closing SSE comment that tells the caller the outcome."""
        events.close()
        answer = Answer(response.headers, events=events.events, too_large=events.overflow)
        confidence, band, _ = self._judge(ctx, answer)
        data = raw
        words = []
        if band is Band.AUTO:
            await self._audit(request, ctx, response, data, confidence)
        elif self.action(band) is not Action.PASS:
            ctx.failure_mode = FailureMode.LOW_CONFIDENCE
            review = self._review(
                request, ctx, response, data, confidence, band.value, "observe", raw_cut
            )
            ticket = await self._enqueue(ctx, review)
            if ticket is None:
                ctx.outcome = Outcome.ERROR
                words = ["error", "failure_mode=low_confidence", "review=unavailable"]
            else:
                ctx.review_id = ticket.review_id
                ctx.outcome = Outcome.ESCALATED
                ctx.emit("escalated", **_escalated(ticket, band, "observe", confidence))
                words = ["escalated", f"review_id={ticket.review_id}"]
        if not words:
            words = [(ctx.outcome or Outcome.OK).value]
        if confidence is not None:
            words.append(f"confidence={confidence:.4f}")
        words.append(f"band={band.value}")
        return (": sidecar-outcome " + " ".join(words) + "\n\n").encode()


def _escalated(
    ticket: ReviewTicket, band: Band, action: str, confidence: float | None
) -> dict[str, object]:
    attrs: dict[str, object] = {
        "review_id": ticket.review_id,
        "band": band.value,
        "action": action,
        "created": ticket.created,
    }
    if confidence is not None:  # span attributes cannot be null
        attrs["confidence"] = confidence
    return attrs


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    lname = name.lower()
    for key, value in headers:
        if key.lower() == lname:
            return value
    return None


class _ObservedStream:
    """An SSE body passed through unchanged, watched as it goes; at its end the gate judges it
    and one closing comment is appended."""

    def __init__(
        self,
        gate: ConfidenceGate,
        request: ProxyRequest,
        ctx: RequestContext,
        response: ProxyResponse,
    ) -> None:
        self._gate = gate
        self._request = request
        self._ctx = ctx
        self._response = response
        self._inner = response.body
        self._events = SseEvents(gate.config.max_body)
        self._raw: list[bytes] = []
        self._raw_size = 0
        self._raw_cut = False
        self._ends_line = True
        self._state = "streaming"  # → "finished" → "closed"

    async def read_chunk(self) -> bytes:
        if self._state != "streaming":
            return b""
        chunk = await self._inner.read_chunk()
        if chunk:
            self._events.feed(chunk)
            self._ends_line = chunk.endswith(b"\n")
            if not self._raw_cut:
                self._raw.append(chunk)
                self._raw_size += len(chunk)
                if self._raw_size > self._gate.config.review_body_limit:
                    self._raw_cut = True
            return chunk
        self._state = "finished"
        raw = b"".join(self._raw)
        self._raw.clear()
        comment = await self._gate.finish_observed(
            self._request, self._ctx, self._response, self._events, raw, self._raw_cut
        )
        # A stream cut off mid-line must not swallow the comment into its last line.
        return comment if self._ends_line else b"\n" + comment

    def close(self) -> None:
        self._state = "closed"
        self._inner.close()
