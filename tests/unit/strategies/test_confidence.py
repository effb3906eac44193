"""The confidence gate and confidence extraction: bands, every action, missing confidence, the
read cap, streams (buffer and observe), audit sampling, and failing closed when the store fails."""

from __future__ import annotations

import gzip
import json
import math
from typing import Any

import pytest

from sidecar.clock import FakeClock
from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.outcome import Outcome
from sidecar.pipeline import ProxyRequest, ProxyResponse
from sidecar.policy.loader import PolicyError, parse_policy
from sidecar.review.store import (
    Decision,
    NewReview,
    ReviewItem,
    ReviewStatus,
    ReviewStoreError,
    ReviewTicket,
)
from sidecar.strategies.confidence import (
    Action,
    ConfidenceConfig,
    ConfidenceGate,
    audit_sampled,
)
from sidecar.strategies.confidence_extract import (
    Answer,
    ConfidenceMissing,
    ExtractConfig,
    SseEvents,
    build_extractor,
)
from sidecar.strategies.fallback import ResponseTemplate
from tests.unit.strategies.scripted import Scripted, StreamingBody, make_ctx, make_request, response

KSERVE = ExtractConfig(kind="kserve_v2", output="predict_proba")
SAFE = ResponseTemplate.from_json(200, [], {"decision": "review"}, True)


def kserve_body(*rows: list[float], name: str = "predict_proba") -> bytes:
    data = [p for row in rows for p in row]
    output = {"name": name, "shape": [len(rows), len(rows[0])], "datatype": "FP64", "data": data}
    return json.dumps({"model_name": "m", "outputs": [output]}).encode()


def chat_body(*probabilities: float) -> bytes:
    content = [{"token": "t", "logprob": math.log(p), "top_logprobs": []} for p in probabilities]
    choice = {"index": 0, "message": {"content": "x"}, "logprobs": {"content": content}}
    return json.dumps({"choices": [choice]}).encode()


def sse(*events: Any) -> list[bytes]:
    chunks = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
    return [*chunks, b"data: [DONE]\n\n"]


def chat_chunk(probability: float) -> dict[str, Any]:
    logprobs = {"content": [{"token": "t", "logprob": math.log(probability)}]}
    return {"choices": [{"index": 0, "delta": {"content": "t"}, "logprobs": logprobs}]}


class FakeQueue:
    """An in-memory review queue: idempotent by request id, optionally failing, with a decision
    to hand to `hold`."""

    def __init__(self, *, fail: bool = False, decision: ReviewItem | None = None) -> None:
        self.fail = fail
        self.decision = decision
        self.items: dict[str, NewReview] = {}
        self.ids: dict[str, str] = {}
        self.waits: list[float] = []

    async def submit(self, review: NewReview) -> ReviewTicket:
        if self.fail:
            raise ReviewStoreError("disk on fire")
        created = review.request_id not in self.ids
        if created:
            self.items[review.request_id] = review
            self.ids[review.request_id] = f"{len(self.ids):032x}"
        review_id = self.ids[review.request_id]
        return ReviewTicket(review_id, f"http://admin/reviews/status/{review_id}.sig", created)

    async def wait_decision(self, review_id: str, timeout: float) -> ReviewItem | None:
        self.waits.append(timeout)
        return self.decision


def decided(decision: Decision, corrected: Any = None) -> ReviewItem:
    return ReviewItem(
        id="0" * 32,
        request_id="req-1",
        trace_id="",
        route="default",
        reason="review",
        action="hold",
        confidence=0.7,
        request={},
        answer={},
        status=ReviewStatus.RESOLVED,
        created_at=0.0,
        decision=decision,
        reviewer="alice",
        corrected=corrected,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ctx(clock: FakeClock) -> RequestContext:
    return make_ctx(clock)


def gate(queue: FakeQueue | None = None, fallback: Any = None, **config: Any) -> ConfidenceGate:
    config.setdefault("extract", KSERVE)
    return ConfidenceGate(ConfidenceConfig(**config), queue, fallback)


async def read(resp: ProxyResponse) -> bytes:
    out = b""
    while chunk := await resp.body.read_chunk():
        out += chunk
    return out


# --- extraction --------------------------------------------------------------------------------


def extract(config: ExtractConfig, body: bytes | None = None, **answer: Any) -> float:
    return build_extractor(config).extract(Answer(answer.pop("headers", []), body=body, **answer))


def test_kserve_top_probability_class_index_and_least_confident_row() -> None:
    assert extract(KSERVE, kserve_body([0.3, 0.7])) == 0.7
    chosen = ExtractConfig(kind="kserve_v2", output="predict_proba", class_index=0)
    assert extract(chosen, kserve_body([0.3, 0.7])) == 0.3
    assert extract(KSERVE, kserve_body([0.99, 0.01], [0.6, 0.4])) == 0.6
    first_output = ExtractConfig(kind="kserve_v2")
    assert extract(first_output, kserve_body([0.1, 0.9], name="other")) == 0.9


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"outputs": []}',
        kserve_body([0.3, 0.7], name="other"),
        b'{"outputs": [{"name": "predict_proba", "data": ["x"]}]}',
        b'{"outputs": [{"name": "predict_proba", "data": [1.5, -0.5]}]}',
        b'{"outputs": [{"name": "predict_proba", "data": [NaN]}]}',
        b'{"outputs": [{"name": "predict_proba", "shape": [1, 3], "data": [0.5, 0.5]}]}',
        b"[" * 5000,
    ],
)
def test_kserve_without_a_usable_probability_is_missing_never_a_crash(body: bytes) -> None:
    with pytest.raises(ConfidenceMissing):
        extract(KSERVE, body)


def test_class_index_out_of_range_is_missing() -> None:
    with pytest.raises(ConfidenceMissing, match="out of range"):
        extract(ExtractConfig(kind="kserve_v2", class_index=5), kserve_body([0.3, 0.7]))


def test_openai_chat_and_completion_logprobs_aggregates() -> None:
    body = chat_body(0.9, 0.5, 0.7)
    mean = ExtractConfig(kind="openai_logprobs")
    assert extract(mean, body) == pytest.approx(0.7)
    assert extract(ExtractConfig(kind="openai_logprobs", aggregate="min"), body) == 0.5
    first = ExtractConfig(kind="openai_logprobs", aggregate="first")
    assert extract(first, body) == pytest.approx(0.9)
    completion = {
        "choices": [
            {"index": 0, "text": "x", "logprobs": {"token_logprobs": [None, math.log(0.4)]}}
        ]
    }
    assert extract(mean, json.dumps(completion).encode()) == pytest.approx(0.4)


def test_openai_logprobs_from_stream_events() -> None:
    events = SseEvents(1 << 20)
    for chunk in sse(chat_chunk(0.8), chat_chunk(0.4)):
        events.feed(chunk[:5])
        events.feed(chunk[5:])
    events.close()
    config = ExtractConfig(kind="openai_logprobs")
    answer = Answer([], events=events.events)
    assert build_extractor(config).extract(answer) == pytest.approx(0.6)


def test_openai_without_logprobs_is_missing() -> None:
    body = json.dumps({"choices": [{"index": 0, "message": {}, "logprobs": None}]}).encode()
    with pytest.raises(ConfidenceMissing, match="logprobs"):
        extract(ExtractConfig(kind="openai_logprobs"), body)


def test_json_path_header_and_cel() -> None:
    body = json.dumps({"result": {"scores": [{"p": 0.42}]}}).encode()
    assert extract(ExtractConfig(kind="json_path", path="$.result.scores[0].p"), body) == 0.42
    with pytest.raises(ConfidenceMissing, match="matched nothing"):
        extract(ExtractConfig(kind="json_path", path="$.nope"), body)
    header = ExtractConfig(kind="header")
    assert extract(header, None, headers=[("X-Model-Confidence", " 0.8 ")]) == 0.8
    with pytest.raises(ConfidenceMissing):
        extract(header, None, headers=[("x-model-confidence", "high")])
    with pytest.raises(ConfidenceMissing):
        extract(header, None, headers=[])
    cel = ExtractConfig(kind="cel", expression="double(response.result.scores[0].p) * 2.0")
    assert extract(cel, body) == 0.84
    with pytest.raises(ConfidenceMissing, match="CEL"):
        extract(ExtractConfig(kind="cel", expression="response.missing.deeper"), body)
    with pytest.raises(ConfidenceMissing, match="bool"):
        extract(ExtractConfig(kind="cel", expression="true"), body)
    with pytest.raises(ConfidenceMissing, match="probability"):
        extract(ExtractConfig(kind="cel", expression="3.0"), body)


def base_policy(confidence: dict[str, Any]) -> dict[str, Any]:
    route = {"name": "r", "confidence": confidence}
    return {"upstreams": {"m": {"url": "http://127.0.0.1:1"}}, "routes": [route]}


def test_a_bad_cel_expression_fails_policy_load_with_its_field_path() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(base_policy({"extract": {"kind": "cel", "expression": "response.x +"}}))
    assert info.value.errors[0].startswith("routes[0].confidence.extract.expression: ")
    with pytest.raises(PolicyError) as info:
        parse_policy(base_policy({"extract": {"kind": "json_path", "path": "$..["}}))
    assert info.value.errors[0].startswith("routes[0].confidence.extract.path: ")


def test_policy_contradictions_are_named() -> None:
    extract_ = {"kind": "header"}
    with pytest.raises(PolicyError) as info:
        parse_policy(base_policy({"extract": extract_, "auto_above": 0.4, "reject_below": 0.6}))
    assert "routes[0].confidence: reject_below" in info.value.errors[0]
    with pytest.raises(PolicyError) as info:
        parse_policy(base_policy({"extract": extract_, "on_reject": "fallback"}))
    assert info.value.errors == [
        "routes[0].confidence.on_reject: fallback needs a fallback chain (routes[0].fallback)"
    ]
    with pytest.raises(PolicyError) as info:
        parse_policy(base_policy({"extract": extract_, "escalate": {"respond": "default"}}))
    assert "safe_default" in info.value.errors[0]


# --- bands and actions ------------------------------------------------------------------------


async def test_auto_band_passes_untouched(ctx: RequestContext) -> None:
    queue = FakeQueue()
    resp = await gate(queue)(
        make_request(), ctx, Scripted(response(body=kserve_body([0.95, 0.05])))
    )
    assert resp.status == 200
    assert json.loads(await read(resp))["outputs"][0]["data"] == [0.95, 0.05]
    assert (ctx.confidence, ctx.confidence_band, ctx.outcome) == (0.95, "auto", None)
    assert ctx.failure_mode is None and not queue.items


async def test_escalate_accepted_answers_202_after_queueing(ctx: RequestContext) -> None:
    queue = FakeQueue()
    upstream_body = StreamingBody([kserve_body([0.7, 0.3])])
    upstream = response(body=upstream_body)
    resp = await gate(queue)(make_request(b'{"inputs": [1]}'), ctx, Scripted(upstream))
    assert resp.status == 202
    body = json.loads(await read(resp))
    assert body["review_id"] == ctx.review_id == queue.ids["req-1"]
    assert body["status_url"].startswith("http://admin/reviews/status/")
    assert resp.header("Location") == body["status_url"]
    assert ctx.outcome is Outcome.ESCALATED
    assert ctx.failure_mode is FailureMode.LOW_CONFIDENCE
    assert (ctx.confidence, ctx.confidence_band) == (0.7, "review")
    item = queue.items["req-1"]
    assert (item.reason, item.action, item.confidence, item.route) == (
        "review",
        "escalate",
        0.7,
        "default",
    )
    assert item.request["body"] == '{"inputs": [1]}'
    assert json.loads(item.answer["body"])["outputs"][0]["data"] == [0.7, 0.3]
    assert [e.name for e in ctx.events] == ["escalated"]


async def test_escalate_answer_passes_the_models_answer_with_a_review_id(
    ctx: RequestContext,
) -> None:
    queue = FakeQueue()
    g = gate(queue, escalate_respond="answer")
    resp = await g(make_request(), ctx, Scripted(response(body=kserve_body([0.7, 0.3]))))
    assert resp.status == 200 and json.loads(await read(resp))["model_name"] == "m"
    assert ctx.review_id == queue.ids["req-1"] and ctx.outcome is Outcome.ESCALATED


async def test_escalate_default_answers_the_safe_default(ctx: RequestContext) -> None:
    g = gate(FakeQueue(), escalate_respond="default", safe_default=SAFE)
    resp = await g(make_request(), ctx, Scripted(response(body=kserve_body([0.7, 0.3]))))
    assert json.loads(await read(resp)) == {"decision": "review"}
    assert ctx.review_id is not None and ctx.outcome is Outcome.ESCALATED


async def test_retried_request_id_is_queued_once(clock: FakeClock) -> None:
    queue = FakeQueue()
    g = gate(queue)
    ids = []
    for _ in range(3):
        ctx = make_ctx(clock, request_id="same")
        await g(make_request(), ctx, Scripted(response(body=kserve_body([0.7, 0.3]))))
        ids.append(ctx.review_id)
    assert len(set(ids)) == 1 and len(queue.items) == 1


async def test_request_info_is_a_422_with_the_configured_fields(ctx: RequestContext) -> None:
    g = gate(
        FakeQueue(),
        on_reject=Action.REQUEST_INFO,
        request_info_fields=("inputs", "customer_id"),
        extract=ExtractConfig(kind="kserve_v2", class_index=0),
    )
    with pytest.raises(SidecarError) as info:
        await g(make_request(), ctx, Scripted(response(body=kserve_body([0.2, 0.8]))))
    err = info.value
    assert (err.mode, err.status) == (FailureMode.LOW_CONFIDENCE, 422)
    assert err.details["request_info"] == {
        "fields": ["inputs", "customer_id"],
        "band": "reject",
        "confidence": 0.2,
    }
    assert ctx.outcome is Outcome.REJECTED


@pytest.mark.parametrize(
    ("decision", "status", "body", "outcome"),
    [
        (decided(Decision.APPROVE), 200, "model", Outcome.ESCALATED),
        (
            decided(Decision.OVERRIDE, {"label": "fraud"}),
            200,
            {"label": "fraud"},
            Outcome.ESCALATED,
        ),
        (decided(Decision.REJECT), 200, {"decision": "review"}, Outcome.REJECTED),
        (None, 200, {"decision": "review"}, Outcome.ESCALATED),
    ],
)
async def test_hold_answers_with_the_reviewers_decision_else_the_safe_default(
    ctx: RequestContext, decision: ReviewItem | None, status: int, body: Any, outcome: Outcome
) -> None:
    queue = FakeQueue(decision=decision)
    g = gate(queue, on_review=Action.HOLD, hold_timeout=3.0, safe_default=SAFE)
    resp = await g(make_request(), ctx, Scripted(response(body=kserve_body([0.7, 0.3]))))
    assert queue.waits == [3.0]
    got = json.loads(await read(resp))
    assert resp.status == status
    assert (got["model_name"] if body == "model" else got) == ("m" if body == "model" else body)
    assert ctx.outcome is outcome and ctx.review_id is not None


async def test_hold_timeout_without_a_safe_default_answers_202(ctx: RequestContext) -> None:
    g = gate(FakeQueue(), on_review=Action.HOLD)
    resp = await g(make_request(), ctx, Scripted(response(body=kserve_body([0.7, 0.3]))))
    assert resp.status == 202 and "hold_expired" in [e.name for e in ctx.events]


class FakeChain:
    def __init__(self, answer: ProxyResponse | None) -> None:
        self.answer = answer
        self.causes: list[SidecarError] = []

    async def run_chain(
        self, request: ProxyRequest, ctx: RequestContext, cause: SidecarError
    ) -> ProxyResponse:
        self.causes.append(cause)
        ctx.failure_mode = cause.mode
        if self.answer is None:
            raise cause
        ctx.outcome = Outcome.FALLBACK
        ctx.fallback_kind = "static"
        return self.answer


async def test_fallback_runs_the_chain_and_its_answer_is_not_judged(ctx: RequestContext) -> None:
    # The fallback's answer would be in the review band too: it is not judged again.
    chain = FakeChain(response(body=b'{"low": 0.1}', content_type="application/json"))
    g = gate(FakeQueue(), chain, on_review=Action.FALLBACK)
    resp = await g(make_request(), ctx, Scripted(response(body=kserve_body([0.7, 0.3]))))
    assert json.loads(await read(resp)) == {"low": 0.1}
    assert chain.causes[0].mode is FailureMode.LOW_CONFIDENCE
    assert ctx.outcome is Outcome.FALLBACK and ctx.failure_mode is FailureMode.LOW_CONFIDENCE
    assert ctx.review_id is None


async def test_an_exhausted_chain_rejects_with_low_confidence(ctx: RequestContext) -> None:
    g = gate(FakeQueue(), FakeChain(None), on_review=Action.FALLBACK)
    with pytest.raises(SidecarError) as info:
        await g(make_request(), ctx, Scripted(response(body=kserve_body([0.7, 0.3]))))
    assert (info.value.mode, info.value.status) == (FailureMode.LOW_CONFIDENCE, 422)
    assert ctx.outcome is Outcome.REJECTED


@pytest.mark.parametrize("action", [Action.ESCALATE, Action.HOLD])
async def test_store_failure_fails_closed_to_the_safe_default(
    ctx: RequestContext, action: Action
) -> None:
    g = gate(FakeQueue(fail=True), on_review=action, escalate_respond="answer", safe_default=SAFE)
    resp = await g(make_request(), ctx, Scripted(response(body=kserve_body([0.7, 0.3]))))
    assert json.loads(await read(resp)) == {"decision": "review"}
    assert ctx.failure_mode is FailureMode.LOW_CONFIDENCE and ctx.outcome is Outcome.REJECTED
    assert ctx.review_id is None
    assert "review_store_failed" in [e.name for e in ctx.events]


async def test_store_failure_without_a_safe_default_is_a_503(ctx: RequestContext) -> None:
    g = gate(FakeQueue(fail=True), escalate_respond="answer")
    with pytest.raises(SidecarError) as info:
        await g(make_request(), ctx, Scripted(response(body=kserve_body([0.7, 0.3]))))
    assert (info.value.mode, info.value.status) == (FailureMode.LOW_CONFIDENCE, 503)
    assert info.value.retry_after == 1


async def test_missing_confidence_is_its_own_outcome(ctx: RequestContext) -> None:
    queue = FakeQueue()
    passing = gate(queue)
    resp = await passing(make_request(), ctx, Scripted(response(body=b'{"no": "outputs"}')))
    assert resp.status == 200 and ctx.confidence_band == "missing" and ctx.outcome is None
    assert [e.name for e in ctx.events] == ["confidence_missing"]
    escalating = gate(queue, on_missing=Action.ESCALATE)
    ctx2 = make_ctx(FakeClock(), request_id="req-2")
    resp = await escalating(make_request(), ctx2, Scripted(response(body=b"garbage")))
    assert resp.status == 202 and queue.items["req-2"].reason == "missing"
    assert queue.items["req-2"].confidence is None


async def test_an_answer_over_the_read_cap_is_missing_and_passes_whole(
    ctx: RequestContext,
) -> None:
    big = kserve_body([0.95, 0.05]) + b" " * 5000
    body = StreamingBody([big[:3000], big[3000:]])
    resp = await gate(FakeQueue(), max_body=1000)(
        make_request(), ctx, Scripted(response(body=body))
    )
    assert ctx.confidence_band == "missing"
    assert await read(resp) == big
    # Escalated instead: the unread rest of the upstream body is closed, not left hanging.
    body = StreamingBody([big[:3000], big[3000:]])
    ctx2 = make_ctx(FakeClock(), request_id="req-2")
    g = gate(FakeQueue(), max_body=1000, on_missing=Action.ESCALATE)
    resp = await g(make_request(), ctx2, Scripted(response(body=body)))
    assert resp.status == 202 and body.closed


async def test_a_gzip_answer_is_judged_and_passed_still_compressed(ctx: RequestContext) -> None:
    packed = gzip.compress(kserve_body([0.7, 0.3]))
    upstream = response(body=packed, headers=[("Content-Encoding", "gzip")])
    resp = await gate(FakeQueue(), escalate_respond="answer")(
        make_request(), ctx, Scripted(upstream)
    )
    assert ctx.confidence == 0.7 and await read(resp) == packed


@pytest.mark.parametrize("status", [201, 404, 500])
async def test_non_200_answers_are_not_judged(ctx: RequestContext, status: int) -> None:
    resp = await gate(FakeQueue())(
        make_request(), ctx, Scripted(response(status, kserve_body([0.7, 0.3])))
    )
    assert resp.status == status and ctx.confidence is None


@pytest.mark.parametrize(
    ("kind", "judged"), [("static", False), ("rules", False), ("cache", False), ("upstream", True)]
)
async def test_only_a_fallback_models_answer_is_judged(
    ctx: RequestContext, kind: str, judged: bool
) -> None:
    async def answered_by_fallback(request: ProxyRequest, c: RequestContext) -> ProxyResponse:
        c.fallback_kind = kind
        return response(body=kserve_body([0.7, 0.3]))

    await gate(FakeQueue())(make_request(), ctx, answered_by_fallback)
    assert (ctx.confidence is not None) is judged


def test_audit_sampling_is_deterministic_and_close_to_the_share() -> None:
    picks = [audit_sampled(f"req-{i}", 0.1) for i in range(5000)]
    assert 400 < sum(picks) < 600
    assert picks == [audit_sampled(f"req-{i}", 0.1) for i in range(5000)]
    assert not audit_sampled("x", 0.0) and audit_sampled("x", 1.0)


async def test_audit_sample_queues_auto_answers_without_changing_them(ctx: RequestContext) -> None:
    queue = FakeQueue()
    resp = await gate(queue, audit_sample=1.0)(
        make_request(), ctx, Scripted(response(body=kserve_body([0.95, 0.05])))
    )
    assert resp.status == 200 and ctx.outcome is None and ctx.review_id is None
    assert queue.items["req-1"].reason == "audit"
    assert ctx.extra["audit_review_id"] == queue.ids["req-1"]


# --- streams -----------------------------------------------------------------------------------

SSE = "text/event-stream"
LOGPROBS = ExtractConfig(kind="openai_logprobs")


async def test_buffer_mode_gates_a_stream_before_sending(ctx: RequestContext) -> None:
    body = StreamingBody(sse(chat_chunk(0.6), chat_chunk(0.6)))
    resp = await gate(FakeQueue(), extract=LOGPROBS)(
        make_request(), ctx, Scripted(response(body=body, content_type=SSE))
    )
    assert resp.status == 202 and ctx.confidence == pytest.approx(0.6)


async def test_observe_mode_streams_through_and_closes_with_the_outcome(
    ctx: RequestContext,
) -> None:
    queue = FakeQueue()
    chunks = sse(chat_chunk(0.6), chat_chunk(0.6))
    resp = await gate(queue, extract=LOGPROBS, stream_mode="observe")(
        make_request(), ctx, Scripted(response(body=StreamingBody(chunks), content_type=SSE))
    )
    assert resp.status == 200 and ctx.outcome is None  # headers say what was known then
    out = await read(resp)
    review_id = queue.ids["req-1"]
    assert (
        out
        == b"".join(chunks)
        + (
            f": sidecar-outcome escalated review_id={review_id} confidence=0.6000 band=review\n\n"
        ).encode()
    )
    assert ctx.outcome is Outcome.ESCALATED and ctx.review_id == review_id
    assert queue.items["req-1"].action == "observe"


async def test_observe_mode_confident_stream_closes_ok(ctx: RequestContext) -> None:
    chunks = sse(chat_chunk(0.99))
    resp = await gate(FakeQueue(), extract=LOGPROBS, stream_mode="observe")(
        make_request(), ctx, Scripted(response(body=StreamingBody(chunks), content_type=SSE))
    )
    out = await read(resp)
    assert out.endswith(b": sidecar-outcome ok confidence=0.9900 band=auto\n\n")


async def test_observe_mode_store_failure_is_told_in_the_closing_comment(
    ctx: RequestContext,
) -> None:
    chunks = sse(chat_chunk(0.6))
    resp = await gate(FakeQueue(fail=True), extract=LOGPROBS, stream_mode="observe")(
        make_request(), ctx, Scripted(response(body=StreamingBody(chunks), content_type=SSE))
    )
    out = await read(resp)
    assert b": sidecar-outcome error failure_mode=low_confidence review=unavailable" in out
    assert ctx.failure_mode is FailureMode.LOW_CONFIDENCE and ctx.review_id is None


async def test_observe_mode_closing_comment_starts_its_own_line(ctx: RequestContext) -> None:
    chunks = [b"data: " + json.dumps(chat_chunk(0.99)).encode() + b"\n\ndata: [DONE]"]
    resp = await gate(FakeQueue(), extract=LOGPROBS, stream_mode="observe")(
        make_request(), ctx, Scripted(response(body=StreamingBody(chunks), content_type=SSE))
    )
    out = await read(resp)
    assert out.endswith(b"data: [DONE]\n: sidecar-outcome ok confidence=0.9900 band=auto\n\n")
