"""Unit tests for `sidecar.demo.faults`: SPEC parsing and the global fault schedule."""

from __future__ import annotations

import random

import pytest

from sidecar.clock import FakeClock
from sidecar.demo.faults import (
    FaultSchedule,
    FaultSpec,
    FaultSpecError,
    format_duration,
    parse_duration,
    parse_spec,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("300ms", 0.3), ("2s", 2.0), ("1.5s", 1.5), ("0ms", 0.0), (" 10ms ", 0.01)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["300", "2m", "-1s", "fast", "", "1 s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration_round_trips() -> None:
    for seconds in (0.3, 0.001, 2.0, 1.5):
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_parse_every_fault() -> None:
    spec = parse_spec(
        "latency=300ms, hang,status=503,retry_after=1s,reset,first_byte_delay=1s,reset_mid_stream,"
        "stall_mid_stream=2s,malformed_json,empty,confidence=0.42,hold_after_first,"
        "chunk_interval=20ms"
    )
    assert spec == FaultSpec(
        latency=0.3,
        hang=True,
        status=503,
        retry_after=1.0,
        reset=True,
        first_byte_delay=1.0,
        reset_mid_stream=True,
        stall_mid_stream=2.0,
        malformed_json=True,
        empty=True,
        confidence=0.42,
        hold_after_first=True,
        chunk_interval=0.02,
    )


def test_empty_spec_is_no_fault() -> None:
    assert parse_spec("") == FaultSpec()
    assert parse_spec(" , ").is_empty


@pytest.mark.parametrize(
    ("text", "item"),
    [
        ("bogus", "bogus"),
        ("latency=300ms,explode", "explode"),
        ("status=abc", "status=abc"),
        ("status=99", "status=99"),
        ("status=600", "status=600"),
        ("status", "status"),
        ("latency=300", "latency=300"),
        ("latency=", "latency="),
        ("confidence=1.5", "confidence=1.5"),
        ("confidence=nan", "confidence=nan"),
        ("confidence=high", "confidence=high"),
        ("reset=1", "reset=1"),
        ("status=503,status=500", "status=500"),
        ("chunk_interval=20", "chunk_interval=20"),
        ("chunk_interval", "chunk_interval"),
    ],
)
def test_bad_specs_name_the_item(text: str, item: str) -> None:
    with pytest.raises(FaultSpecError) as info:
        parse_spec(text)
    assert info.value.item == item
    assert item.partition("=")[0] in str(info.value)


def test_unknown_fault_lists_the_known_ones() -> None:
    with pytest.raises(FaultSpecError, match="known faults: latency"):
        parse_spec("bogus")


def test_str_is_the_canonical_spec() -> None:
    spec = parse_spec("confidence=0.42,latency=300ms,status=429,retry_after=2s,reset_mid_stream")
    assert parse_spec(str(spec)) == spec
    assert str(FaultSpec()) == ""


def test_chunk_interval_round_trips_and_zero_is_set() -> None:
    assert str(parse_spec("chunk_interval=20ms")) == "chunk_interval=20ms"
    off = parse_spec("chunk_interval=0ms")
    assert off.chunk_interval == 0.0  # set to none, which overrides a server-wide pacing
    assert not off.is_empty
    assert parse_spec(str(off)) == off
    assert FaultSpec().chunk_interval is None


def test_chunk_interval_is_a_rate_the_first_one_wins() -> None:
    header = parse_spec("chunk_interval=20ms")
    scheduled = parse_spec("chunk_interval=50ms,latency=100ms")
    assert header.combine(scheduled).chunk_interval == 0.02
    assert FaultSpec().combine(scheduled).chunk_interval == 0.05
    assert parse_spec("chunk_interval=0ms").combine(scheduled).chunk_interval == 0.0


def test_mid_body_faults() -> None:
    assert not parse_spec("latency=1s,status=503").mid_body
    assert not parse_spec("chunk_interval=20ms").mid_body  # SSE only: a JSON body stays whole
    for text in (
        "first_byte_delay=1s",
        "reset_mid_stream",
        "stall_mid_stream=1s",
        "hold_after_first",
    ):
        assert parse_spec(text).mid_body


def test_combine_stacks_delays_and_flags_first_value_wins() -> None:
    a = parse_spec("latency=100ms,status=503,confidence=0.4")
    b = parse_spec("latency=200ms,status=500,reset_mid_stream,confidence=0.9,retry_after=1s")
    combined = a.combine(b)
    assert combined.latency == pytest.approx(0.3)
    assert combined.status == 503
    assert combined.confidence == 0.4
    assert combined.retry_after == 1.0
    assert combined.reset_mid_stream
    assert FaultSpec().combine(b) == b


def _schedule(clock: FakeClock | None = None, seed: int = 7) -> FaultSchedule:
    return FaultSchedule(now=(clock or FakeClock()).monotonic, rng=random.Random(seed))


def test_count_applies_to_the_next_n_requests() -> None:
    schedule = _schedule()
    schedule.add(parse_spec("status=503"), count=2)
    assert [schedule.draw().status for _ in range(3)] == [503, 503, None]
    assert schedule.active() == []


def test_seconds_applies_until_the_window_ends() -> None:
    clock = FakeClock()
    schedule = _schedule(clock)
    schedule.add(parse_spec("latency=1s"), seconds=5)
    assert schedule.draw().latency == 1.0
    clock.advance(4.9)
    assert schedule.draw().latency == 1.0
    assert schedule.active()[0]["seconds_left"] == pytest.approx(0.1)
    clock.advance(0.1)
    assert schedule.draw().is_empty
    assert schedule.active() == []


def test_rate_follows_the_seeded_rng() -> None:
    schedule = _schedule(seed=42)
    schedule.add(parse_spec("status=500"), rate=0.5)
    hits = [schedule.draw().status == 500 for _ in range(200)]
    expected_rng = random.Random(42)
    assert hits == [expected_rng.random() < 0.5 for _ in range(200)]
    assert 60 < sum(hits) < 140


def test_rate_with_count_counts_only_applied_requests() -> None:
    schedule = _schedule(seed=1)
    schedule.add(parse_spec("empty"), rate=0.5, count=3)
    hits = 0
    for _ in range(100):
        hits += schedule.draw().empty
    assert hits == 3


def test_rate_extremes() -> None:
    never = _schedule()
    never.add(parse_spec("reset"), rate=0.0)
    assert not any(never.draw().reset for _ in range(50))
    always = _schedule()
    always.add(parse_spec("reset"), rate=1.0)
    assert all(always.draw().reset for _ in range(50))


def test_faults_stack_in_order() -> None:
    schedule = _schedule()
    schedule.add(parse_spec("latency=100ms,status=503"), count=1)
    schedule.add(parse_spec("latency=200ms,status=500,confidence=0.3"), count=2)
    first = schedule.draw()
    assert first.latency == pytest.approx(0.3)
    assert first.status == 503
    assert first.confidence == 0.3
    second = schedule.draw()
    assert second.status == 500
    assert schedule.draw().is_empty


def test_active_describes_and_clear_removes() -> None:
    clock = FakeClock()
    schedule = _schedule(clock)
    schedule.add(parse_spec("status=503"), count=3)
    schedule.add(parse_spec("latency=300ms"), seconds=10, rate=0.25)
    schedule.draw()
    listed = schedule.active()
    assert listed[0] == {"id": 1, "spec": "status=503", "applied": 1, "remaining": 2}
    assert listed[1]["spec"] == "latency=300ms"
    assert listed[1]["rate"] == 0.25
    assert schedule.clear() == 2
    assert schedule.active() == []
    assert schedule.draw().is_empty


@pytest.mark.parametrize(
    ("payload", "item"),
    [
        ("not an object", None),
        ({"count": 1}, "spec"),
        ({"spec": 3, "count": 1}, "spec"),
        ({"spec": "", "count": 1}, "spec"),
        ({"spec": "bogus", "count": 1}, "bogus"),
        ({"spec": "status=503"}, "count"),
        ({"spec": "status=503", "count": 0}, "count"),
        ({"spec": "status=503", "count": 1.5}, "count"),
        ({"spec": "status=503", "count": True}, "count"),
        ({"spec": "status=503", "seconds": 0}, "seconds"),
        ({"spec": "status=503", "seconds": "5"}, "seconds"),
        ({"spec": "status=503", "rate": 1.5}, "rate"),
        ({"spec": "status=503", "count": 1, "forever": True}, "forever"),
    ],
)
def test_add_from_json_rejects(payload: object, item: str | None) -> None:
    schedule = _schedule()
    with pytest.raises(FaultSpecError) as info:
        schedule.add_from_json(payload)
    assert info.value.item == item
    assert schedule.active() == []


def test_add_from_json_accepts() -> None:
    schedule = _schedule()
    fault = schedule.add_from_json({"spec": "status=503,retry_after=1s", "seconds": 2, "count": 4})
    assert fault.spec == FaultSpec(status=503, retry_after=1.0)
    assert fault.remaining == 4
    assert schedule.active()[0]["seconds_left"] == 2.0
