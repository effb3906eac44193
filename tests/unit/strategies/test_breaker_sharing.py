"""CircuitBreaker's side of shared state: adopting another replica's open, and probing early when
another replica closed. The local breaker stays authoritative."""

from __future__ import annotations

import pytest

from sidecar.clock import FakeClock
from sidecar.errors import FailureMode, SidecarError
from sidecar.strategies.breaker import BreakerConfig, CircuitBreaker, State


def make(clock: FakeClock, **config: object) -> tuple[CircuitBreaker, list[tuple[str, str]]]:
    fields: dict[str, object] = {"consecutive_failures": 2, "open_for": 5.0, "jitter": 0.0}
    fields.update(config)
    breaker = CircuitBreaker("model", BreakerConfig(**fields), clock)  # type: ignore[arg-type]
    seen: list[tuple[str, str]] = []
    breaker.listeners.append(lambda b, old, new, ctx: seen.append((old, new)))
    return breaker, seen


def test_an_adopted_open_fails_fast_until_the_shared_moment_then_probes() -> None:
    clock = FakeClock()
    breaker, seen = make(clock)
    assert breaker.adopt_open(clock.monotonic() + 3.0)
    assert breaker.state == State.OPEN and breaker.open_adopted
    assert seen == [(State.CLOSED, State.OPEN)]  # listeners (metrics) see the transition
    with pytest.raises(SidecarError) as info:
        breaker.admit()
    assert info.value.mode == FailureMode.CIRCUIT_OPEN
    assert info.value.retry_after == pytest.approx(3.0)
    clock.advance(3.0)
    probe = breaker.admit()
    assert probe.probe  # our own probe decides
    breaker.record_success(probe)
    assert breaker.state == State.CLOSED and not breaker.open_adopted
    # An adopted open is not an open of our own: no backoff growth for the next one.
    assert breaker.reopens == 0 and breaker.open_count == 0


def test_adopting_only_opens_or_extends_never_shortens() -> None:
    clock = FakeClock()
    breaker, seen = make(clock)
    breaker.force("open")
    own_until = breaker.open_until
    assert not breaker.adopt_open(own_until - 1.0)
    assert not breaker.adopt_open(clock.monotonic() - 1.0)
    assert breaker.open_until == own_until and not breaker.open_adopted
    assert breaker.adopt_open(own_until + 10.0)
    assert breaker.open_until == own_until + 10.0
    assert seen == [(State.CLOSED, State.OPEN)]  # extending is not a transition


def test_a_probe_in_flight_when_another_replica_opens_is_ignored() -> None:
    clock = FakeClock()
    breaker, _ = make(clock)
    breaker.force("open")
    clock.advance(5.0)
    probe = breaker.admit()
    assert probe.probe  # half-open probe
    assert breaker.adopt_open(clock.monotonic() + 4.0)
    breaker.record_success(probe)  # the probe's answer arrives after the shared open
    assert breaker.state == State.OPEN and breaker.probes_in_flight == 0


def test_a_disabled_breaker_adopts_nothing() -> None:
    clock = FakeClock()
    breaker, _ = make(clock, enabled=False)
    assert not breaker.adopt_open(clock.monotonic() + 3.0)
    assert breaker.state == State.CLOSED


def test_another_replicas_close_makes_the_next_call_a_probe() -> None:
    clock = FakeClock()
    breaker, _ = make(clock)
    breaker.force("open")
    assert breaker.hasten_probe()
    assert breaker.snapshot()["next_probe_in"] == 0
    probe = breaker.admit()
    assert probe.probe and breaker.state == State.HALF_OPEN
    breaker.record_failure(probe)  # the model is still failing for us: we open again ourselves
    assert breaker.state == State.OPEN and not breaker.open_adopted
    closed, _ = make(clock)
    assert not closed.hasten_probe()


def test_the_snapshot_shows_the_sharing_status_only_when_shared() -> None:
    clock = FakeClock()
    breaker, _ = make(clock)
    assert "shared" not in breaker.snapshot()
    breaker.sync = {"storage": "redis://127.0.0.1:6379/0", "connected": False, "errors": 3}
    breaker.adopt_open(clock.monotonic() + 1.0)
    shared = breaker.snapshot()["shared"]
    assert shared == {
        "storage": "redis://127.0.0.1:6379/0",
        "connected": False,
        "errors": 3,
        "open_adopted": True,
    }
