"""The policy file's schema: frozen pydantic models, unknown keys rejected.

This is the edge: YAML is parsed into these models once, then `sidecar.policy.builder` turns them
into plain config objects for the strategies. Nothing downstream sees pydantic or YAML.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from sidecar.policy.units import ByteSize, Duration, parse_duration

__all__ = [
    "AlertRulesPolicy",
    "AlertsPolicy",
    "BackoffPolicy",
    "BreakerPolicy",
    "CacheFallbackPolicy",
    "ConcurrencyPolicy",
    "ConfidenceExtractPolicy",
    "ConfidencePolicy",
    "EscalatePolicy",
    "FailureRedactPolicy",
    "FailureRetentionPolicy",
    "FailuresPolicy",
    "FallbackPolicy",
    "HedgePolicy",
    "HoldPolicy",
    "LimitsPolicy",
    "MatchPolicy",
    "Policy",
    "RequestInfoPolicy",
    "ResponseTemplatePolicy",
    "RetryBudgetPolicy",
    "RetryPolicy",
    "ReviewWebhookPolicy",
    "ReviewsPolicy",
    "RoutePolicy",
    "RulePolicy",
    "ServerPolicy",
    "TimeoutsPolicy",
    "TracingPolicy",
    "UpstreamPolicy",
    "ValidatePolicy",
]

_HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BreakerPolicy(_Model):
    """A circuit breaker: opens on consecutive failures or on a failure ratio over a window."""

    enabled: bool = Field(True, description="Turn the breaker off entirely (not recommended).")
    consecutive_failures: int = Field(
        5, ge=1, description="Open after this many availability failures in a row."
    )
    failure_ratio: float = Field(
        0.5, gt=0, le=1, description="Open when this share of calls in the window failed..."
    )
    min_calls: int = Field(20, ge=1, description="...once at least this many calls were seen.")
    window: Duration = Field(30.0, gt=0, description="Sliding window for the failure ratio.")
    open_for: Duration = Field(5.0, gt=0, description="How long the circuit stays open at first.")
    open_for_max: Duration = Field(
        60.0, gt=0, description="Cap on the open duration, which doubles on repeated opens."
    )
    jitter: float = Field(
        0.1, ge=0, le=1, description="Random share added to the open duration (0.1 = up to +10%)."
    )
    half_open_probes: int = Field(
        1, ge=1, description="Requests let through while half-open; the rest fail fast."
    )
    storage: str | None = Field(
        None,
        description="Share open/closed with other replicas through Redis, e.g. "
        "redis://127.0.0.1:6379/0 (local state stays authoritative; synchronised in the "
        "background). Local only when absent.",
    )
    storage_prefix: str = Field(
        "sidecar:breaker:",
        min_length=1,
        description="Redis key and channel prefix; give each deployment its own, so two "
        "services' upstreams of the same name do not share a circuit.",
    )

    @field_validator("storage")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value


class ConcurrencyPolicy(_Model):
    """A bulkhead: in-flight cap plus a bounded queue; the excess is shed with 503."""

    max_in_flight: int = Field(64, ge=1, description="Requests sent to the upstream at once.")
    queue: int = Field(32, ge=0, description="Requests that may wait for a slot.")
    queue_timeout: Duration = Field(0.1, ge=0, description="How long a request may wait.")
    retry_after: Duration = Field(1.0, gt=0, description="Retry-After sent with a shed request.")
    adaptive: bool = Field(
        False, description="Adapt the limit to latency (AIMD) between min_in_flight and max."
    )
    adaptive_latency: Duration = Field(
        1.0, gt=0, description="Adaptive: answers slower than this (to headers) shrink the limit."
    )
    min_in_flight: int = Field(1, ge=1, description="Adaptive: the limit never goes below this.")
    backoff_ratio: float = Field(
        0.9, gt=0, lt=1, description="Adaptive: the limit is multiplied by this on congestion."
    )


class UpstreamPolicy(_Model):
    """A model server the sidecar forwards to."""

    url: str = Field(..., description="Origin of the model server, e.g. http://127.0.0.1:8080.")
    pool_size: int = Field(
        256, ge=1, description="Connections kept to this upstream; keep above in-flight + hedges."
    )
    breaker: BreakerPolicy = Field(default_factory=BreakerPolicy)
    concurrency: ConcurrencyPolicy | None = Field(
        None, description="Load shedding for this upstream; off when absent."
    )

    @field_validator("url")
    @classmethod
    def _origin_only(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        if not parts.hostname:
            raise ValueError("must name a host")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        if parts.path not in ("", "/"):
            raise ValueError("must be an origin (scheme, host, port) without a path")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"has a bad port: {exc}") from None
        return value.rstrip("/")


class MatchPolicy(_Model):
    """Which requests a route takes: a path prefix and, optionally, methods."""

    path_prefix: str = Field("/", description="Matches this path and everything below it.")
    methods: tuple[str, ...] | None = Field(None, description="HTTP methods; all when absent.")

    @field_validator("path_prefix")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with /")
        return value

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        upper = tuple(m.upper() for m in value)
        unknown = [m for m in upper if m not in _HTTP_METHODS]
        if unknown:
            raise ValueError(f"unknown HTTP method(s): {', '.join(unknown)}")
        return upper


class TimeoutsPolicy(_Model):
    """Timeouts, each its own failure mode."""

    total: Duration = Field(
        30.0, gt=0, description="Deadline for the whole request: every attempt and backoff."
    )
    attempt: Duration = Field(
        10.0, gt=0, description="One attempt, until the upstream's response headers."
    )
    connect: Duration = Field(1.0, gt=0, description="TCP connect to the upstream.")
    first_byte: Duration | None = Field(
        10.0, gt=0, description="From headers to the first body chunk (first SSE data event)."
    )
    stream_idle: Duration | None = Field(
        30.0, gt=0, description="Largest allowed gap between body chunks or SSE events."
    )

    def effective(self) -> TimeoutsPolicy:
        """Defaults clamped to the values the user set: a 2s deadline with the default 10s
        attempt timeout means a 2s attempt timeout."""
        attempt = min(self.attempt, self.total)
        connect = min(self.connect, attempt)
        first_byte = None if self.first_byte is None else min(self.first_byte, self.total)
        return self.model_copy(
            update={"attempt": attempt, "connect": connect, "first_byte": first_byte}
        )


class BackoffPolicy(_Model):
    """Exponential backoff with full jitter between attempts."""

    base: Duration = Field(0.025, ge=0, description="First backoff ceiling.")
    max: Duration = Field(0.25, ge=0, description="Largest backoff ceiling.")


class RetryPolicy(_Model):
    """Retries of availability failures, before any byte reached the caller."""

    max_attempts: int = Field(3, ge=1, description="Attempts in all, the first included.")
    backoff: BackoffPolicy = Field(default_factory=BackoffPolicy)
    replay_limit: ByteSize = Field(
        1024 * 1024, ge=0, description="Request bodies up to this size are kept for replay."
    )
    honour_retry_after: bool = Field(True, description="Wait what Retry-After asks (capped).")


class RetryBudgetPolicy(_Model):
    """Finagle/Linkerd retry budget: retries may add at most `ratio` of the request rate."""

    ratio: float = Field(0.2, ge=0, le=10, description="Retries allowed per request.")
    min_per_second: float = Field(10.0, ge=0, description="Retries always allowed per second.")
    ttl: Duration = Field(10.0, gt=0, description="How long a deposit counts.")


_QUANTILE = re.compile(r"^p(\d{1,2}(?:\.\d+)?)$")


class HedgePolicy(_Model):
    """Hedged requests: a slow attempt gets a second one; the first good answer wins."""

    enabled: bool = Field(
        False,
        description="Send hedges on this route (idempotent routes only). Each hedge spends a "
        "retry-budget token; the losing attempt is cancelled.",
    )
    delay: str = Field(
        "50ms",
        description="Wait this long for an answer before hedging (e.g. 50ms), or the upstream's "
        "recent latency quantile (e.g. p95).",
    )
    max_hedges: int = Field(1, ge=1, le=3, description="Extra attempts at most, per attempt.")

    @field_validator("delay", mode="before")
    @classmethod
    def _delay(cls, value: object) -> str:
        if isinstance(value, str) and _QUANTILE.match(value.strip().lower()):
            quantile = value.strip().lower()
            if not 0 < float(quantile[1:]) < 100:
                raise ValueError("a latency quantile must be between p1 and p99.9")
            return quantile
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise ValueError(f"{exc} (or a latency quantile like p95)") from None
        return value.strip() if isinstance(value, str) else f"{seconds}s"

    @property
    def quantile(self) -> float | None:
        """The latency quantile (0.95 for `p95`), or None for a fixed delay."""
        return float(self.delay[1:]) / 100 if self.delay.startswith("p") else None

    @property
    def seconds(self) -> float | None:
        """The fixed delay in seconds, or None for a latency quantile."""
        return None if self.delay.startswith("p") else parse_duration(self.delay)


class ValidatePolicy(_Model):
    """Checks on a 200 answer: 'bad but 200' becomes `invalid_output`."""

    json_body: bool = Field(
        True, description="The answer must be JSON when it says application/json."
    )
    json_schema: str | None = Field(
        None, description="Path of a JSON Schema file (relative to the policy file)."
    )
    reject_empty: bool = Field(True, description="An empty 200 body is invalid.")
    reject_non_finite: bool = Field(True, description="NaN or Infinity anywhere is invalid.")
    max_body: ByteSize = Field(
        4 * 1024 * 1024, ge=1, description="Bodies larger than this are not buffered to validate."
    )


_NO_TEMPLATE_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te"}
)


class ResponseTemplatePolicy(_Model):
    """An answer the sidecar makes up: status, headers and a JSON body."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    status: int = Field(200, ge=200, le=599, description="HTTP status of the answer.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra response headers.")
    json_: JsonValue = Field(
        None, alias="json", description="The JSON body (Content-Type application/json)."
    )
    body: str | None = Field(
        None,
        description="A raw text body instead of `json` (e.g. SSE events for streaming callers); "
        "set its Content-Type in `headers`.",
    )

    @model_validator(mode="after")
    def _one_body(self) -> ResponseTemplatePolicy:
        if self.body is not None and "json_" in self.model_fields_set:
            raise ValueError("give either json or body, not both")
        return self

    @field_validator("headers")
    @classmethod
    def _safe_headers(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        for name, item in value.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not a valid header name")
            lname = name.lower()
            if lname in _NO_TEMPLATE_HEADERS or lname.startswith("x-sidecar-"):
                raise ValueError(f"{name!r} is set by the sidecar itself")
            if "\r" in item or "\n" in item:
                raise ValueError(f"the value of {name!r} must not contain line breaks")
        return value

    @property
    def has_body(self) -> bool:
        return "json_" in self.model_fields_set


class RulePolicy(_Model):
    """A `rules` fallback entry: when the CEL expression holds, answer with `respond`."""

    when: str = Field(
        ...,
        min_length=1,
        description="CEL over `request` (the body as JSON), `method`, `path` and `headers`.",
    )
    respond: ResponseTemplatePolicy


class CacheFallbackPolicy(_Model):
    """The last-known-good cache: this route's good answers, per request body and caller."""

    ttl: Duration = Field(600.0, gt=0, description="How long an answer may be served again.")
    max_entries: int = Field(1000, ge=1, description="Answers kept (least recently used go).")
    key_headers: tuple[str, ...] = Field(
        ("authorization",),
        description="Headers that identify the caller: part of the key, so no caller gets "
        "another's answer.",
    )
    max_body: ByteSize = Field(
        1024 * 1024, ge=1, description="Answers larger than this are not kept."
    )

    @field_validator("key_headers")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.lower() for v in value)


_FALLBACK_KINDS = ("upstream", "cache", "rules", "static")


class FallbackPolicy(_Model):
    """One link of the fallback chain: exactly one of `upstream`, `cache`, `rules`, `static`."""

    upstream: str | None = Field(
        None, description="Another upstream, called through its own breaker and attempt timeout."
    )
    cache: CacheFallbackPolicy | None = Field(None, description="The last-known-good answer.")
    rules: tuple[RulePolicy, ...] | None = Field(
        None, description="CEL rules over the request; the first that holds answers."
    )
    static: ResponseTemplatePolicy | None = Field(None, description="A safe default answer.")

    @model_validator(mode="after")
    def _exactly_one(self) -> FallbackPolicy:
        kinds = [k for k in _FALLBACK_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "each fallback is exactly one of upstream, cache, rules or static"
                + (f" (got {', '.join(kinds)})" if kinds else "")
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in _FALLBACK_KINDS if getattr(self, k) is not None)


class ConfidenceExtractPolicy(_Model):
    """Where the confidence is in the answer."""

    kind: Literal["kserve_v2", "openai_logprobs", "json_path", "header", "cel"] = Field(
        ..., description="kserve_v2 | openai_logprobs | json_path | header | cel"
    )
    output: str | None = Field(
        None, description="kserve_v2: the output's name (e.g. predict_proba); the first if absent."
    )
    class_index: int | None = Field(
        None, ge=0, description="kserve_v2: judge this class's probability, not the top one."
    )
    aggregate: Literal["mean", "min", "first"] = Field(
        "mean", description="openai_logprobs: mean token probability, the minimum, or the first."
    )
    path: str | None = Field(None, description="json_path: e.g. $.confidence")
    header: str = Field("x-model-confidence", description="header: the header's name.")
    expression: str | None = Field(
        None, description="cel: a number from `response` (the JSON answer) and `headers`."
    )

    @field_validator("path")
    @classmethod
    def _json_path(cls, value: str | None) -> str | None:
        if value is not None:
            from sidecar.strategies.confidence_extract import compile_json_path

            compile_json_path(value)
        return value

    @field_validator("expression")
    @classmethod
    def _cel(cls, value: str | None) -> str | None:
        if value is not None:
            from sidecar.strategies.confidence_extract import compile_cel

            compile_cel(value)
        return value

    @model_validator(mode="after")
    def _needs(self) -> ConfidenceExtractPolicy:
        if self.kind == "json_path" and not self.path:
            raise ValueError("kind json_path needs `path`")
        if self.kind == "cel" and not self.expression:
            raise ValueError("kind cel needs `expression`")
        return self


ConfidenceAction = Literal["pass", "escalate", "request_info", "hold", "fallback"]


class EscalatePolicy(_Model):
    """What the caller gets when its answer is queued for review."""

    respond: Literal["accepted", "answer", "default"] = Field(
        "accepted",
        description="accepted: 202 with {review_id, status_url}; answer: the model's answer; "
        "default: the safe default (both with x-sidecar-review-id).",
    )


class HoldPolicy(_Model):
    timeout: Duration = Field(
        5.0, gt=0, le=600, description="Wait this long for a reviewer, then the safe default."
    )


class RequestInfoPolicy(_Model):
    fields: tuple[str, ...] = Field((), description="What the caller should send (422 hint).")
    message: str = Field(
        "the model is not confident enough; send more information",
        description="The 422 envelope's message.",
    )


class ConfidencePolicy(_Model):
    """The confidence gate: auto / review / reject bands and what each one does."""

    extract: ConfidenceExtractPolicy
    auto_above: float = Field(0.9, ge=0, le=1, description="At or above: passes (auto band).")
    reject_below: float = Field(0.5, ge=0, le=1, description="Below: the reject band.")
    on_review: ConfidenceAction = Field("escalate", description="Action for the review band.")
    on_reject: ConfidenceAction = Field("escalate", description="Action for the reject band.")
    on_missing: ConfidenceAction = Field(
        "pass", description="Action when the answer carries no usable confidence."
    )
    escalate: EscalatePolicy = Field(default_factory=EscalatePolicy)
    hold: HoldPolicy = Field(default_factory=HoldPolicy)
    request_info: RequestInfoPolicy = Field(default_factory=RequestInfoPolicy)
    safe_default: ResponseTemplatePolicy | None = Field(
        None, description="The answer used when the model's cannot be (and the store fails)."
    )
    audit_sample: float = Field(
        0.0, ge=0, le=1, description="Share of auto answers also queued (from the request id)."
    )
    stream_mode: Literal["buffer", "observe"] = Field(
        "buffer",
        description="SSE: buffer (gate before sending, capped) or observe (stream through, "
        "judge and queue at the end).",
    )
    max_body: ByteSize = Field(
        4 * 1024 * 1024, ge=1, description="Most bytes read to judge; larger is `missing`."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ConfidencePolicy:
        if self.reject_below > self.auto_above:
            raise ValueError(
                f"reject_below ({self.reject_below}) must not be above auto_above "
                f"({self.auto_above})"
            )
        if self.escalate.respond == "default" and self.safe_default is None:
            raise ValueError("escalate.respond: default needs a safe_default")
        return self


class RoutePolicy(_Model):
    """A route: what to match, where to send it, and how to protect it."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    match: MatchPolicy = Field(default_factory=MatchPolicy)
    upstream: str | None = Field(None, description="Upstream name; the default upstream if absent.")
    idempotent: bool = Field(
        False,
        description="Timeouts and 5xx may be retried (otherwise only connect errors, 429/503).",
    )
    timeouts: TimeoutsPolicy = Field(default_factory=TimeoutsPolicy)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    retry_budget: RetryBudgetPolicy = Field(default_factory=RetryBudgetPolicy)
    hedge: HedgePolicy = Field(default_factory=HedgePolicy)
    breaker: BreakerPolicy | None = Field(
        None, description="Overrides the upstream's breaker for this route (its own breaker)."
    )
    concurrency: ConcurrencyPolicy | None = Field(
        None, description="Overrides the upstream's bulkhead for this route."
    )
    validate_: ValidatePolicy | None = Field(
        None, alias="validate", description="Output validation; off when absent."
    )
    fallback: tuple[FallbackPolicy, ...] = Field(
        (),
        description="Tried in order when the model cannot answer; end with a static default.",
    )
    confidence: ConfidencePolicy | None = Field(
        None, description="The confidence gate and the human review path; off when absent."
    )


class ServerPolicy(_Model):
    """Where the sidecar listens. Flags beat environment, environment beats this section."""

    host: str = Field("127.0.0.1", description="Proxy listener address.")
    port: int = Field(8700, ge=0, le=65535, description="Proxy listener port (0 = any free port).")
    admin_host: str = Field("127.0.0.1", description="Admin listener address.")
    admin_port: int = Field(8701, ge=0, le=65535, description="Admin listener port.")


class LimitsPolicy(_Model):
    """Limits on what callers may send. Each answers with a clear status."""

    max_body: ByteSize = Field(
        32 * 1024 * 1024, ge=0, description="Largest request body, counted while streaming (413)."
    )
    max_header_bytes: ByteSize = Field(
        32 * 1024, ge=1024, description="Largest request head: all header names and values (431)."
    )
    max_headers: int = Field(100, ge=8, le=10000, description="Most request headers (431).")
    header_timeout: Duration = Field(
        10.0, gt=0, description="A request head must arrive within this (408, then close)."
    )
    body_idle: Duration = Field(
        30.0, gt=0, description="Largest gap while reading a request body (408)."
    )
    max_connections: int = Field(
        4096, ge=1, description="Open client connections; past this a new one gets 503."
    )
    keepalive_timeout: Duration = Field(
        75.0, gt=0, description="Idle keep-alive connections are closed after this."
    )


class TracingPolicy(_Model):
    """Failure-biased trace sampling (`SIDECAR_TRACE_SUCCESS_RATIO` beats this)."""

    success_ratio: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of plain successes exported, chosen from the trace id; every failed, "
        "retried, fallback, escalated or rejected request is always exported.",
    )


class BreakerOpenedAlert(_Model):
    """Alert when a circuit opens."""

    enabled: bool = True


class FailureRatioAlert(_Model):
    """Alert when a route's share of failed requests over a window is above a threshold."""

    enabled: bool = True
    threshold: float = Field(0.05, gt=0, le=1, description="Failed share that alerts.")
    window: Duration = Field(300.0, gt=0, description="Sliding window.")
    min_requests: int = Field(20, ge=1, description="Requests in the window before it counts.")


class EscalationSpikeAlert(_Model):
    """Alert when a route's escalation rate jumps above its recent baseline."""

    enabled: bool = True
    window: Duration = Field(600.0, gt=0, description="Recent window compared to the baseline.")
    baseline: Duration = Field(21600.0, gt=0, description="The period before the window.")
    factor: float = Field(3.0, gt=1, description="Alert above this multiple of the baseline.")
    min_escalations: int = Field(5, ge=1, description="Escalations in the window to count.")


class ReviewBacklogAlert(_Model):
    """Alert when the oldest pending review has waited too long."""

    enabled: bool = True
    older_than: Duration = Field(1800.0, gt=0, description="Age of the oldest pending review.")


class AlertRulesPolicy(_Model):
    breaker_opened: BreakerOpenedAlert = Field(default_factory=BreakerOpenedAlert)
    failure_ratio: FailureRatioAlert = Field(default_factory=FailureRatioAlert)
    escalation_spike: EscalationSpikeAlert = Field(default_factory=EscalationSpikeAlert)
    review_backlog: ReviewBacklogAlert = Field(default_factory=ReviewBacklogAlert)


class AlertsPolicy(_Model):
    """In-process alert rules posted to a webhook (`SIDECAR_ALERT_WEBHOOK_URL` beats the URL)."""

    webhook_url: str | None = Field(
        None, description="Where alerts are POSTed as JSON; without one they are only logged."
    )
    format: Literal["json", "slack"] = Field(
        "json", description="`slack` posts a Slack incoming-webhook payload (text + blocks)."
    )
    cooldown: Duration = Field(
        600.0, ge=0, description="The same alert (rule and subject) is sent at most this often."
    )
    timeout: Duration = Field(5.0, gt=0, description="Timeout of one webhook POST.")
    evaluate_every: Duration = Field(
        15.0, gt=0, description="How often time-based rules (review backlog) are checked."
    )
    rules: AlertRulesPolicy = Field(default_factory=AlertRulesPolicy)

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


class FailureRedactPolicy(_Model):
    """What never reaches a stored failure record (or an export)."""

    headers: tuple[str, ...] = Field(
        (),
        description="Header names whose values are replaced; authorization, cookie, set-cookie, "
        "x-api-key and similar credentials always are.",
    )
    json_paths: tuple[str, ...] = Field(
        (), description="JSONPath expressions into request and answer bodies, e.g. $.user.ssn."
    )
    patterns: tuple[str, ...] = Field(
        (), description="Regular expressions replaced wherever they match in stored text."
    )
    emails: bool = Field(True, description="Replace email addresses.")
    card_numbers: bool = Field(True, description="Replace card numbers (Luhn-checked digit runs).")

    @field_validator("json_paths")
    @classmethod
    def _json_paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from sidecar.failures.redact import compile_json_path

        for path in value:
            compile_json_path(path)
        return value

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from sidecar.failures.redact import compile_pattern

        for pattern in value:
            compile_pattern(pattern)
        return value


class FailureRetentionPolicy(_Model):
    max_age: Duration = Field(
        30 * 86400.0, gt=0, description="Records older than this are deleted (e.g. 720h)."
    )
    max_rows: int = Field(
        100_000, ge=100, description="The oldest records beyond this many are deleted."
    )


class FailuresPolicy(_Model):
    """Failure capture: every failed, fallback, shed, escalated, rejected or user-reported
    request is stored (redacted) for `sidecar failures report` and `export`."""

    enabled: bool = Field(True, description="Capture failure records.")
    redact: FailureRedactPolicy = Field(default_factory=FailureRedactPolicy)
    max_excerpt: ByteSize = Field(
        4096, ge=256, le=1024 * 1024, description="Largest stored request or answer excerpt."
    )
    retention: FailureRetentionPolicy = Field(default_factory=FailureRetentionPolicy)


class ReviewWebhookPolicy(_Model):
    """Review events (`review.created`, `review.resolved`) POSTed as signed JSON from a durable
    outbox (`SIDECAR_WEBHOOK_URL` beats `url`; the secret is read from the environment only)."""

    url: str | None = Field(None, description="Receiver URL; no webhooks without one.")
    secret_env: str = Field(
        "SIDECAR_WEBHOOK_SECRET",
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="Environment variable holding the HMAC-SHA256 signing secret (16+ chars).",
    )
    timeout: Duration = Field(
        5.0,
        gt=0,
        description="Timeout of one delivery attempt (until the status); a later answer counts "
        "as failed and the event is sent again (receivers dedupe on its id).",
    )
    backoff: BackoffPolicy = Field(
        default_factory=lambda: BackoffPolicy(base=1.0, max=300.0),
        description="Exponential backoff between attempts of one event.",
    )
    max_age: Duration = Field(
        86400.0, gt=0, description="Undelivered events older than this are dropped (logged)."
    )
    outbox_max: int = Field(
        10_000, ge=10, description="Most undelivered events kept; past it the oldest are dropped."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


class ReviewsPolicy(_Model):
    """Where the review queue lives, who hears about it, and what the review page masks."""

    store: Literal["auto", "sqlite", "postgres"] = Field(
        "auto",
        description="auto: PostgreSQL when the `url_env` variable holds a postgresql:// URL, "
        "else SQLite under SIDECAR_STATE_DIR.",
    )
    url_env: str = Field(
        "SIDECAR_DATABASE_URL",
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="Environment variable holding the PostgreSQL URL (never the URL itself).",
    )
    database_schema: str | None = Field(
        None,
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="PostgreSQL schema for the tables (created if missing); "
        "SIDECAR_DATABASE_SCHEMA beats it.",
    )
    pool_size: int = Field(10, ge=1, le=200, description="Most PostgreSQL connections.")
    timeout: Duration = Field(
        3.0, gt=0, le=60, description="Waiting longer for the database fails closed."
    )
    sensitive_fields: tuple[str, ...] = Field(
        (),
        description="JSONPath expressions into request and answer bodies masked on the review "
        "page until a reviewer reveals them (logged), e.g. $.customer.ssn.",
    )
    webhook: ReviewWebhookPolicy = Field(default_factory=ReviewWebhookPolicy)

    @field_validator("sensitive_fields")
    @classmethod
    def _json_paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from sidecar.strategies.confidence_extract import compile_json_path

        for path in value:
            compile_json_path(path)
        return value


class Policy(_Model):
    """A whole policy file."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    version: Literal[1] = 1
    server: ServerPolicy = Field(default_factory=ServerPolicy)
    limits: LimitsPolicy = Field(default_factory=LimitsPolicy)
    default_upstream: str | None = Field(
        None, description="Upstream for routes that name none; the first upstream when absent."
    )
    upstreams: dict[str, UpstreamPolicy] = Field(...)
    routes: tuple[RoutePolicy, ...] = Field(...)
    tracing: TracingPolicy = Field(default_factory=TracingPolicy)
    alerts: AlertsPolicy = Field(default_factory=AlertsPolicy)
    failures: FailuresPolicy = Field(default_factory=FailuresPolicy)
    reviews: ReviewsPolicy = Field(default_factory=ReviewsPolicy)
