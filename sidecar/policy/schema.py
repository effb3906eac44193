"""The policy file's schema: frozen pydantic models, unknown keys rejected.

This is the edge: YAML is parsed into these models once, then `sidecar.policy.builder` turns them
into plain config objects for the strategies. Nothing downstream sees pydantic or YAML.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sidecar.policy.units import ByteSize, Duration

__all__ = [
    "BackoffPolicy",
    "BreakerPolicy",
    "ConcurrencyPolicy",
    "LimitsPolicy",
    "MatchPolicy",
    "Policy",
    "RetryBudgetPolicy",
    "RetryPolicy",
    "RoutePolicy",
    "ServerPolicy",
    "TimeoutsPolicy",
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


class ConcurrencyPolicy(_Model):
    """A bulkhead: in-flight cap plus a bounded queue; the excess is shed with 503."""

    max_in_flight: int = Field(64, ge=1, description="Requests sent to the upstream at once.")
    queue: int = Field(32, ge=0, description="Requests that may wait for a slot.")
    queue_timeout: Duration = Field(0.1, ge=0, description="How long a request may wait.")


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
    breaker: BreakerPolicy | None = Field(
        None, description="Overrides the upstream's breaker for this route (its own breaker)."
    )
    concurrency: ConcurrencyPolicy | None = Field(
        None, description="Overrides the upstream's bulkhead for this route."
    )
    validate_: ValidatePolicy | None = Field(
        None, alias="validate", description="Output validation; off when absent."
    )


class ServerPolicy(_Model):
    """Where the sidecar listens. Flags beat environment, environment beats this section."""

    host: str = Field("127.0.0.1", description="Proxy listener address.")
    port: int = Field(8700, ge=0, le=65535, description="Proxy listener port (0 = any free port).")
    admin_host: str = Field("127.0.0.1", description="Admin listener address.")
    admin_port: int = Field(8701, ge=0, le=65535, description="Admin listener port.")


class LimitsPolicy(_Model):
    """Limits on what callers may send."""

    max_body: ByteSize = Field(
        32 * 1024 * 1024, ge=0, description="Largest request body, counted while streaming."
    )


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
