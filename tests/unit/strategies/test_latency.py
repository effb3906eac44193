"""LatencyTracker: a fixed ring of recent attempt latencies with median and quantiles."""

from __future__ import annotations

import pytest

from sidecar.strategies.latency import LatencyTracker


def test_empty_tracker_has_no_median() -> None:
    tracker = LatencyTracker()
    assert tracker.median() is None
    assert tracker.quantile(0.95) is None


def test_median_and_quantiles() -> None:
    tracker = LatencyTracker()
    for seconds in (0.5, 0.1, 0.4, 0.2, 0.3):
        tracker.record(seconds)
    assert tracker.median() == 0.3
    assert tracker.quantile(0.0) == 0.1
    assert tracker.quantile(1.0) == 0.5
    assert tracker.quantile(0.95) == 0.5


def test_single_value() -> None:
    tracker = LatencyTracker()
    tracker.record(0.25)
    assert tracker.median() == 0.25
    assert tracker.quantile(0.99) == 0.25


def test_ring_keeps_only_the_most_recent_values() -> None:
    tracker = LatencyTracker(size=4)
    for seconds in (10.0, 10.0, 10.0, 10.0):
        tracker.record(seconds)
    for seconds in (0.1, 0.2, 0.3, 0.4):
        tracker.record(seconds)
    # The slow past has been overwritten entirely.
    assert tracker.quantile(1.0) == pytest.approx(0.4)
    assert tracker.median() == pytest.approx(0.2)


def test_partially_filled_ring_ignores_unused_slots() -> None:
    tracker = LatencyTracker(size=128)
    tracker.record(2.0)
    tracker.record(4.0)
    assert tracker.quantile(0.0) == 2.0  # not the zeros of the empty slots
    assert tracker.median() == 2.0
