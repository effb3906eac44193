"""In-process alert rules, posted as JSON to a webhook (or a Slack incoming webhook).

The same rules as `deploy/k8s/monitoring/prometheusrule.yaml`, for teams without Prometheus
alerting, evaluated inside the sidecar from what it sees:

- `breaker_opened`: a circuit opened (per upstream), at once;
- `failure_ratio`: a route's share of failed requests over a sliding window is above a threshold,
  once at least `min_requests` were seen in it (failed = a failure mode that is not the caller's:
  client errors, cancellations and low confidence do not count);
- `escalation_spike`: a route's escalations to human review in the recent window, as a rate, are
  above `factor` times its rate over the `baseline` period before it, and at least
  `min_escalations` (the baseline is the time watched so far when shorter; in the first
  `window` after a start there is no baseline and the rule waits);
- `review_backlog`: the oldest pending review has waited longer than `older_than` (checked every
  `evaluate_every`).

Each alert has a key (rule and subject, e.g. `breaker_opened:model`); the same key is sent at
most once per `cooldown`; repeats in between are counted and reported with the next one. Delivery
runs in background tasks with a timeout and a bound on pending posts, so a slow or dead receiver
never slows a request; every alert is also logged. The webhook URL comes from
`SIDECAR_ALERT_WEBHOOK_URL`, else the policy's `alerts.webhook_url`; without one, alerts are only
logged. Configuration is re-read from the current policy, so a reload applies at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sidecar.clock import Clock
from sidecar.policy.schema import AlertsPolicy
from sidecar.strategies.breaker import CircuitBreaker, State
from sidecar.telemetry.metrics import Metrics

__all__ = ["Alert", "AlertEngine", "AlertsConfig", "alert_payload"]

ENV_WEBHOOK = "SIDECAR_ALERT_WEBHOOK_URL"
_MAX_PENDING = 64
_SLOTS = 10


@dataclass(frozen=True)
class FailureRatioRule:
    threshold: float
    window: float
    min_requests: int


@dataclass(frozen=True)
class EscalationSpikeRule:
    window: float
    baseline: float
    factor: float
    min_escalations: int


@dataclass(frozen=True)
class AlertsConfig:
    webhook_url: str | None = None
    format: str = "json"
    cooldown: float = 600.0
    timeout: float = 5.0
    evaluate_every: float = 15.0
    breaker_opened: bool = True
    failure_ratio: FailureRatioRule | None = None
    escalation_spike: EscalationSpikeRule | None = None
    review_backlog: float | None = None

    @classmethod
    def from_policy(cls, policy: AlertsPolicy, env_url: str | None = None) -> AlertsConfig:
        rules = policy.rules
        fr, es, rb = rules.failure_ratio, rules.escalation_spike, rules.review_backlog
        return cls(
            webhook_url=env_url or policy.webhook_url,
            format=policy.format,
            cooldown=policy.cooldown,
            timeout=policy.timeout,
            evaluate_every=policy.evaluate_every,
            breaker_opened=rules.breaker_opened.enabled,
            failure_ratio=FailureRatioRule(fr.threshold, fr.window, fr.min_requests)
            if fr.enabled
            else None,
            escalation_spike=EscalationSpikeRule(
                es.window, es.baseline, es.factor, es.min_escalations
            )
            if es.enabled
            else None,
            review_backlog=rb.older_than if rb.enabled else None,
        )


@dataclass(frozen=True)
class Alert:
    rule: str
    key: str
    severity: str
    summary: str
    description: str
    labels: dict[str, str] = field(default_factory=dict)
    value: float | None = None
    threshold: float | None = None


class _Buckets:
    """Counts in fixed time slots, so a window costs constant memory at any rate."""

    def __init__(self, slot: float, span: float) -> None:
        self.slot = slot
        self.slots = max(1, math.ceil(span / slot))
        self.counts: dict[int, list[float]] = {}

    def add(self, now: float, *values: float) -> None:
        index = math.floor(now / self.slot)
        row = self.counts.setdefault(index, [0.0] * len(values))
        for i, value in enumerate(values):
            row[i] += value
        oldest = index - self.slots
        for key in [k for k in self.counts if k <= oldest]:
            del self.counts[key]

    def total(self, now: float, start_ago: float, end_ago: float = 0.0) -> list[float]:
        """Sums over slots between `start_ago` and `end_ago` seconds before `now`."""
        first = math.floor((now - start_ago) / self.slot) + 1
        last = math.floor((now - end_ago) / self.slot)
        out: list[float] = []
        for index, row in self.counts.items():
            if first <= index <= last:
                if not out:
                    out = [0.0] * len(row)
                for i, value in enumerate(row):
                    out[i] += value
        return out


def _format_value(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3g}"


def alert_payload(
    alert: Alert, fmt: str, *, instance: str, fired_at: float, suppressed: int
) -> Any:
    """The JSON body posted for an alert: our own object, or Slack's `text` + `blocks`."""
    when = dt.datetime.fromtimestamp(fired_at, tz=dt.UTC).isoformat().replace("+00:00", "Z")
    if fmt == "slack":
        labels = ", ".join(f"{k}={v}" for k, v in sorted(alert.labels.items()))
        icon = ":rotating_light:" if alert.severity == "critical" else ":warning:"
        text = f"{icon} [{alert.severity}] {alert.summary}"
        context = f"`{alert.rule}` on {instance} · {labels} · {when}"
        if suppressed:
            context += f" · {suppressed} repeat(s) suppressed"
        return {
            "text": text,
            "blocks": [
                {
                    "type": "section",
                    "text": {"type": "mrkdwn", "text": f"*{text}*\n{alert.description}"},
                },
                {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
            ],
        }
    return {
        "source": "ai-resilience-sidecar",
        "status": "firing",
        "alert": alert.rule,
        "key": alert.key,
        "severity": alert.severity,
        "summary": alert.summary,
        "description": alert.description,
        "labels": dict(alert.labels),
        "value": alert.value,
        "threshold": alert.threshold,
        "instance": instance,
        "fired_at": when,
        "suppressed_since_last": suppressed,
    }


class AlertEngine:
    """The rules, their windows, the cooldown, and webhook delivery for one app."""

    def __init__(
        self,
        policy: Callable[[], AlertsPolicy | None],
        clock: Clock,
        metrics: Metrics,
        log: Any,
        env: dict[str, str] | None = None,
    ) -> None:
        env = env if env is not None else dict(os.environ)
        self._policy = policy
        self._env_url = env.get(ENV_WEBHOOK) or None
        self._cached: tuple[AlertsPolicy | None, AlertsConfig | None] = (None, None)
        self.clock = clock
        self.metrics = metrics
        self.log = log
        self._started = clock.monotonic()
        self.instance = env.get("POD_NAME") or env.get("HOSTNAME") or socket.gethostname()
        self._last_sent: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._requests: dict[str, tuple[float, _Buckets]] = {}
        self._escalations: dict[str, tuple[tuple[float, float], _Buckets]] = {}
        self._pending: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._ticker: asyncio.Task[None] | None = None

    # -- configuration -------------------------------------------------------------------------
    def config(self) -> AlertsConfig | None:
        policy = self._policy()
        if policy is None:
            return None
        cached_policy, cached = self._cached
        if cached_policy is not policy:
            cached = AlertsConfig.from_policy(policy, self._env_url)
            self._cached = (policy, cached)
        return cached

    # -- inputs --------------------------------------------------------------------------------
    def breaker_transition(self, breaker: CircuitBreaker, old: str, new: str, ctx: Any) -> None:
        config = self.config()
        if config is None or not config.breaker_opened or new != State.OPEN:
            return
        if breaker.open_adopted:
            # Another replica opened the shared circuit and alerted; adopting its open here
            # would repeat the same alert once per replica.
            return
        snapshot = breaker.snapshot()
        self.fire(
            Alert(
                rule="breaker_opened",
                key=f"breaker_opened:{breaker.name}",
                severity="warning",
                summary=f"Circuit to upstream {breaker.name} opened",
                description=(
                    f"The breaker for {breaker.name} opened after "
                    f"{snapshot['consecutive_failures']} consecutive failures "
                    f"({snapshot['window_failures']} of {snapshot['window_calls']} calls failed in "
                    f"its window); calls are refused with circuit_open or answered by a fallback "
                    f"for {snapshot['next_probe_in']}s, then one probe is let through."
                ),
                labels={"upstream": breaker.name},
                value=float(snapshot["open_count"]),
            ),
            config,
        )

    def record_request(self, route: str, failed: bool) -> None:
        config = self.config()
        if config is None or config.failure_ratio is None or not route:
            return
        rule = config.failure_ratio
        now = self.clock.monotonic()
        stored = self._requests.get(route)
        if stored is None or stored[0] != rule.window:
            buckets = _Buckets(rule.window / _SLOTS, rule.window)
            self._requests[route] = (rule.window, buckets)
        else:
            buckets = stored[1]
        buckets.add(now, 1.0, 1.0 if failed else 0.0)
        if not failed:
            return
        requests, failures = buckets.total(now, rule.window) or [0.0, 0.0]
        if requests < rule.min_requests:
            return
        ratio = failures / requests
        if ratio > rule.threshold:
            self.fire(
                Alert(
                    rule="failure_ratio",
                    key=f"failure_ratio:{route}",
                    severity="critical" if ratio > 0.25 else "warning",
                    summary=f"Route {route}: {ratio:.0%} of requests failed",
                    description=(
                        f"{int(failures)} of {int(requests)} requests on route {route} failed in "
                        f"the last {rule.window:g}s (threshold {rule.threshold:.0%}). See "
                        f"sidecar_failures_total by mode, and Jaeger "
                        f"(sidecar.route={route} error=true) for examples."
                    ),
                    labels={"route": route},
                    value=round(ratio, 4),
                    threshold=rule.threshold,
                ),
                config,
            )

    def record_escalation(self, route: str) -> None:
        config = self.config()
        if config is None or config.escalation_spike is None:
            return
        rule = config.escalation_spike
        now = self.clock.monotonic()
        shape = (rule.window, rule.baseline)
        stored = self._escalations.get(route)
        if stored is None or stored[0] != shape:
            buckets = _Buckets(rule.window / _SLOTS, rule.window + rule.baseline)
            self._escalations[route] = (shape, buckets)
        else:
            buckets = stored[1]
        buckets.add(now, 1.0)
        # The baseline covers only the time this engine has watched before the window: right
        # after a start there is none, and a spike cannot be told from a steady rate.
        history = min(rule.baseline, now - self._started - rule.window)
        if history <= 0:
            return
        recent = (buckets.total(now, rule.window) or [0.0])[0]
        before = (buckets.total(now, rule.window + history, rule.window) or [0.0])[0]
        rate = recent / rule.window
        baseline_rate = before / history
        if recent >= rule.min_escalations and rate > rule.factor * baseline_rate:
            self.fire(
                Alert(
                    rule="escalation_spike",
                    key=f"escalation_spike:{route}",
                    severity="warning",
                    summary=f"Route {route}: escalations to human review spiked",
                    description=(
                        f"{int(recent)} escalations on route {route} in the last "
                        f"{rule.window:g}s ({rate * 60:.3g}/min) against "
                        f"{baseline_rate * 60:.3g}/min over the {rule.baseline:g}s before: "
                        f"the model or its inputs may have drifted."
                    ),
                    labels={"route": route},
                    value=round(rate * 60, 4),
                    threshold=round(rule.factor * baseline_rate * 60, 4),
                ),
                config,
            )

    def evaluate(self) -> None:
        """Time-based rules (the review backlog); run every `evaluate_every`."""
        config = self.config()
        if config is None or config.review_backlog is None:
            return
        pending, oldest = self.metrics.review_backlog()
        if not pending or oldest is None:
            return
        age = self.clock.wall() - oldest
        if age > config.review_backlog:
            self.fire(
                Alert(
                    rule="review_backlog",
                    key="review_backlog",
                    severity="warning",
                    summary=f"The oldest pending review has waited {age / 60:.0f} minutes",
                    description=(
                        f"{pending} request(s) wait for human review; the oldest for "
                        f"{age:.0f}s (limit {config.review_backlog:g}s). Reviewers are needed at "
                        f"/ui on the sidecar's admin port."
                    ),
                    labels={},
                    value=round(age, 1),
                    threshold=config.review_backlog,
                ),
                config,
            )

    # -- firing and delivery -------------------------------------------------------------------
    def fire(self, alert: Alert, config: AlertsConfig) -> bool:
        """Send `alert` unless the same key was sent within the cooldown. True when sent."""
        now = self.clock.monotonic()
        last = self._last_sent.get(alert.key)
        if last is not None and now - last < config.cooldown:
            self._suppressed[alert.key] = self._suppressed.get(alert.key, 0) + 1
            self.metrics.alert(alert.rule, "suppressed")
            return False
        self._last_sent[alert.key] = now
        suppressed = self._suppressed.pop(alert.key, 0)
        self.log.warning(
            "alert",
            rule=alert.rule,
            severity=alert.severity,
            summary=alert.summary,
            labels=alert.labels,
            value=alert.value,
            webhook=config.webhook_url is not None,
        )
        if config.webhook_url is None:
            self.metrics.alert(alert.rule, "logged")
            return True
        if len(self._pending) >= _MAX_PENDING:
            self.metrics.alert(alert.rule, "dropped")
            return True
        body = alert_payload(
            alert,
            config.format,
            instance=self.instance,
            fired_at=self.clock.wall(),
            suppressed=suppressed,
        )
        try:
            task = asyncio.get_running_loop().create_task(
                self._deliver(alert, config.webhook_url, config.timeout, body)
            )
        except RuntimeError:  # no running loop (a unit test calling a rule directly)
            self.metrics.alert(alert.rule, "dropped")
            return True
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return True

    async def _deliver(self, alert: Alert, url: str, timeout: float, body: Any) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
            )
        try:
            async with self._session.post(
                url, json=body, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
            ) as response:
                await response.read()
                ok = 200 <= response.status < 300
                detail = f"status {response.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            ok = False
            detail = type(exc).__name__
        self.metrics.alert(alert.rule, "sent" if ok else "failed")
        if not ok:
            # Never the URL: a Slack webhook URL is a secret.
            self.log.warning("alert_delivery_failed", rule=alert.rule, error=detail)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            config = self.config()
            await asyncio.sleep(config.evaluate_every if config is not None else 15.0)
            try:
                self.evaluate()
            except Exception as exc:
                self.log.error("alert_evaluation_failed", error=repr(exc))

    async def close(self, timeout: float = 1.0) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._pending:
            # Alerts already fired get a short, bounded chance to go out.
            await asyncio.wait(set(self._pending), timeout=timeout)
            for task in self._pending:
                task.cancel()
        if self._session is not None:
            await self._session.close()
