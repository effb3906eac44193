"""`StatusWindow`: rates are taken against the oldest sample inside the window (or the newest one
before it), with a fake clock."""

from __future__ import annotations

from sidecar.clock import FakeClock
from sidecar.server.status import StatusWindow, Totals


def totals(clock: FakeClock, ok: float) -> Totals:
    return Totals(clock.monotonic(), {("r", "ok"): ok}, {})


def test_first_call_compares_with_the_start() -> None:
    clock = FakeClock()
    window = StatusWindow(clock, window=60)
    clock.advance(10)
    baseline = window.observe(totals(clock, 5))
    assert baseline.at == window.started
    assert baseline.requests == {}


def test_polling_keeps_a_window_of_samples() -> None:
    clock = FakeClock()
    window = StatusWindow(clock, window=60)
    seen = []
    for i in range(1, 61):  # a poll every 2 s for two minutes
        clock.advance(2)
        seen.append(window.observe(totals(clock, i)))
    last = seen[-1]
    # The baseline of the last poll is the newest sample at least 60 s old: exactly 60 s ago.
    assert clock.monotonic() - last.at == 60
    assert last.requests[("r", "ok")] == 30


def test_a_quiet_spell_covers_the_time_since_the_previous_call() -> None:
    clock = FakeClock()
    window = StatusWindow(clock, window=60)
    clock.advance(5)
    window.observe(totals(clock, 1))
    clock.advance(600)
    baseline = window.observe(totals(clock, 9))
    assert clock.monotonic() - baseline.at == 600
    assert baseline.requests[("r", "ok")] == 1


def test_samples_are_bounded() -> None:
    clock = FakeClock()
    window = StatusWindow(clock, window=1e9, max_samples=8)
    for i in range(100):
        clock.advance(0.01)
        window.observe(totals(clock, i))
    assert len(window._samples) == 8
