"""Alert rules on a fake clock: when each fires, the cooldown, the payloads, and delivery."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from sidecar.clock import FakeClock
from sidecar.policy.schema import AlertsPolicy
from sidecar.strategies.breaker import BreakerConfig, CircuitBreaker
from sidecar.telemetry.alerts import Alert, AlertEngine, alert_payload
from sidecar.telemetry.metrics import Metrics


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def record(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return record


def engine(
    clock: FakeClock, metrics: Metrics | None = None, **policy: Any
) -> tuple[AlertEngine, Log]:
    log = Log()
    alerts = AlertsPolicy.model_validate(policy)
    return AlertEngine(lambda: alerts, clock, metrics or Metrics(), log, env={}), log


def fired(log: Log) -> list[tuple[str, dict[str, str]]]:
    return [(f["rule"], f["labels"]) for level, event, f in log.lines if event == "alert"]


def test_breaker_opened_fires_on_open_only() -> None:
    clock = FakeClock()
    alerts, log = engine(clock)
    breaker = CircuitBreaker("model", BreakerConfig(consecutive_failures=1), clock)
    breaker.listeners.append(alerts.breaker_transition)
    breaker.record_failure(breaker.admit())
    assert fired(log) == [("breaker_opened", {"upstream": "model"})]
    breaker.force("close")
    assert len(fired(log)) == 1


def test_an_open_adopted_from_another_replica_does_not_alert_again() -> None:
    clock = FakeClock()
    alerts, log = engine(clock)
    breaker = CircuitBreaker("model", BreakerConfig(consecutive_failures=1), clock)
    breaker.listeners.append(alerts.breaker_transition)
    assert breaker.adopt_open(clock.monotonic() + 30)  # the replica that opened it alerted
    assert breaker.state == "open" and fired(log) == []
    clock.advance(31)
    breaker.record_failure(breaker.admit())  # our own probe fails: our own open
    assert fired(log) == [("breaker_opened", {"upstream": "model"})]


def test_cooldown_per_key_then_again_after_it() -> None:
    clock = FakeClock()
    metrics = Metrics()
    alerts, log = engine(clock, metrics, cooldown="10m")
    config = alerts.config()
    assert config is not None
    a = Alert("breaker_opened", "breaker_opened:a", "warning", "s", "d", {"upstream": "a"})
    b = Alert("breaker_opened", "breaker_opened:b", "warning", "s", "d", {"upstream": "b"})
    assert alerts.fire(a, config) and alerts.fire(b, config)
    assert not alerts.fire(a, config)
    clock.advance(599)
    assert not alerts.fire(a, config)
    clock.advance(2)
    assert alerts.fire(a, config)
    samples = {(n, tuple(sorted(ls.items()))): v for n, ls, v in metrics.samples()}
    key = ("sidecar_alerts_total", (("result", "suppressed"), ("rule", "breaker_opened")))
    assert samples[key] == 2
    assert len(fired(log)) == 3


def test_failure_ratio_needs_min_requests_and_forgets_old_requests() -> None:
    clock = FakeClock()
    alerts, log = engine(
        clock, rules={"failure_ratio": {"threshold": 0.5, "window": "60s", "min_requests": 4}}
    )
    for failed in (True, True, True):
        alerts.record_request("fraud", failed)
    assert fired(log) == []  # 3 of 3 failed, but fewer than min_requests
    clock.advance(120)  # those fall out of the window
    for failed in (False, False, True, False):
        alerts.record_request("fraud", failed)
    assert fired(log) == []  # 1 of 4
    alerts.record_request("fraud", True)
    alerts.record_request("fraud", True)
    assert fired(log) == []  # 3 of 6 is not above 0.5
    alerts.record_request("fraud", True)
    assert fired(log) == [("failure_ratio", {"route": "fraud"})]  # 4 of 7


def test_escalation_spike_against_the_baseline() -> None:
    clock = FakeClock()
    rule = {"window": "10m", "baseline": "1h", "factor": 3, "min_escalations": 5}
    alerts, log = engine(clock, rules={"escalation_spike": rule})
    # An hour of steady escalations: 1 a minute (10 per window) is the baseline.
    for _ in range(60):
        alerts.record_escalation("chat")
        clock.advance(60)
    assert fired(log) == []
    # Then 2 a minute: twice the baseline, under the factor.
    for _ in range(20):
        alerts.record_escalation("chat")
        clock.advance(30)
    assert fired(log) == []
    # Then a burst: 40 in the next minute.
    for _ in range(40):
        alerts.record_escalation("chat")
        clock.advance(1.5)
    assert fired(log) == [("escalation_spike", {"route": "chat"})]


def test_escalation_spike_needs_history_and_a_minimum() -> None:
    clock = FakeClock()
    alerts, log = engine(clock, rules={"escalation_spike": {"min_escalations": 5}})
    for _ in range(10):  # right after start: no baseline yet, so no spike can be claimed
        alerts.record_escalation("chat")
    assert fired(log) == []
    clock.advance(7200)  # two hours without escalations, then a few: under the minimum
    for _ in range(4):
        alerts.record_escalation("chat")
    assert fired(log) == []
    alerts.record_escalation("chat")
    assert fired(log) == [("escalation_spike", {"route": "chat"})]


def test_review_backlog_older_than() -> None:
    clock = FakeClock()
    metrics = Metrics()
    alerts, log = engine(clock, metrics, rules={"review_backlog": {"older_than": "30m"}})
    metrics.set_review_backlog(3, clock.wall() - 600)
    alerts.evaluate()
    assert fired(log) == []
    clock.advance(1201)
    alerts.evaluate()
    assert fired(log) == [("review_backlog", {})]
    metrics.set_review_backlog(0, None)
    clock.advance(3600)
    alerts.evaluate()
    assert len(fired(log)) == 1


def test_disabled_rules_never_fire() -> None:
    clock = FakeClock()
    off = {"enabled": False}
    alerts, log = engine(
        clock,
        rules={"breaker_opened": off, "failure_ratio": off, "escalation_spike": off},
    )
    breaker = CircuitBreaker("model", BreakerConfig(consecutive_failures=1), clock)
    alerts.breaker_transition(breaker, "closed", "open", None)
    for _ in range(50):
        alerts.record_request("r", True)
        alerts.record_escalation("r")
    assert fired(log) == []


def test_payloads() -> None:
    alert = Alert(
        "failure_ratio", "failure_ratio:r", "critical", "Route r failed", "details", {"route": "r"}
    )
    body = alert_payload(alert, "json", instance="pod-1", fired_at=1_700_000_000, suppressed=2)
    assert body["alert"] == "failure_ratio" and body["labels"] == {"route": "r"}
    assert body["fired_at"] == "2023-11-14T22:13:20Z"
    assert body["suppressed_since_last"] == 2 and body["instance"] == "pod-1"
    slack = alert_payload(alert, "slack", instance="pod-1", fired_at=1_700_000_000, suppressed=2)
    assert slack["text"] == ":rotating_light: [critical] Route r failed"
    assert (
        slack["blocks"][0]["text"]["text"]
        == "*:rotating_light: [critical] Route r failed*\ndetails"
    )
    assert "2 repeat(s) suppressed" in slack["blocks"][1]["elements"][0]["text"]


async def test_delivery_posts_json_and_survives_a_failing_receiver() -> None:
    received: list[Any] = []
    statuses = [200, 500]

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=statuses[len(received) - 1])

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    clock = FakeClock()
    metrics = Metrics()
    alerts, log = engine(clock, metrics, webhook_url=f"http://127.0.0.1:{port}/hook", cooldown=0)
    config = alerts.config()
    assert config is not None
    try:
        alert = Alert("breaker_opened", "k", "warning", "s", "d", {"upstream": "m"})
        alerts.fire(alert, config)
        alerts.fire(alert, config)
        await asyncio.wait_for(asyncio.gather(*alerts._pending), 5)
    finally:
        await alerts.close()
        await runner.cleanup()
    assert [b["alert"] for b in received] == ["breaker_opened", "breaker_opened"]
    results = {ls["result"]: v for n, ls, v in metrics.samples() if n == "sidecar_alerts_total"}
    assert results == {"sent": 1, "failed": 1}
    assert ("warning", "alert_delivery_failed") in [(lv, ev) for lv, ev, _ in log.lines]


def test_env_webhook_beats_the_policy() -> None:
    alerts_policy = AlertsPolicy.model_validate({"webhook_url": "http://policy/hook"})
    engine_ = AlertEngine(
        lambda: alerts_policy,
        FakeClock(),
        Metrics(),
        Log(),
        env={"SIDECAR_ALERT_WEBHOOK_URL": "http://env/hook"},
    )
    config = engine_.config()
    assert config is not None and config.webhook_url == "http://env/hook"


def test_webhook_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="http"):
        AlertsPolicy.model_validate({"webhook_url": "ftp://x"})
