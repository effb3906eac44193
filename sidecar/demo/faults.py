"""Fault specs and the global fault schedule of the demo model (pure logic, no I/O).

A fault SPEC is a comma-separated list of items, e.g. `latency=300ms,status=503,retry_after=1s`.
`parse_spec` turns it into a frozen `FaultSpec` once; the server only reads the typed fields.
`FaultSchedule` holds the globally registered faults (for the next N requests, for S seconds, or
with a probability per request) and `draw()` picks the ones that apply to one request. Time and
randomness are injected so the schedule is unit-tested without sleeping.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = [
    "FAULT_NAMES",
    "ActiveFault",
    "FaultSchedule",
    "FaultSpec",
    "FaultSpecError",
    "format_duration",
    "parse_duration",
    "parse_spec",
]

#: Every item a SPEC may contain; the value column says what `name=value` takes.
FAULT_NAMES: Mapping[str, str] = {
    "latency": "duration: delay before the response headers",
    "hang": "flag: never answer until the client goes away",
    "status": "HTTP status 100-599: answer it with a JSON error body",
    "retry_after": "duration: add Retry-After to a `status` answer",
    "reset": "flag: close the connection without a response",
    "first_byte_delay": "duration: send the headers, then wait that long before the body",
    "reset_mid_stream": "flag: send headers and the first chunk, then abort the connection",
    "stall_mid_stream": "duration: pause that long after the first chunk",
    "malformed_json": "flag: 200 with a body that is not valid JSON",
    "empty": "flag: 200 with an empty body",
    "confidence": "number 0-1: probability of the model's answer",
    "hold_after_first": "flag: after the first chunk, wait for POST /_demo/release",
    "chunk_interval": "duration: wait that long before each SSE event after the first (pacing)",
}

_FLAGS = frozenset(
    {"hang", "reset", "reset_mid_stream", "malformed_json", "empty", "hold_after_first"}
)
_DURATIONS = frozenset(
    {"latency", "first_byte_delay", "stall_mid_stream", "retry_after", "chunk_interval"}
)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)$")


class FaultSpecError(ValueError):
    """A SPEC (or a schedule request) is invalid; `item` names the offending part."""

    def __init__(self, message: str, item: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.item = item


def parse_duration(text: str) -> float:
    """`300ms` → 0.3, `2s` → 2.0, `1.5s` → 1.5. A unit is required: `300` is ambiguous."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration; use e.g. 300ms or 2s")
    value = float(match.group(1))
    return value / 1000.0 if match.group(2) == "ms" else value


def format_duration(seconds: float) -> str:
    """The inverse of `parse_duration`, for listing active faults."""
    if seconds < 1.0:
        return f"{round(seconds * 1000.0, 3):g}ms"
    return f"{round(seconds, 3):g}s"


@dataclass(frozen=True)
class FaultSpec:
    """What to do to one request. The empty spec (`FaultSpec()`) does nothing."""

    latency: float = 0.0
    hang: bool = False
    status: int | None = None
    retry_after: float | None = None
    reset: bool = False
    first_byte_delay: float = 0.0
    reset_mid_stream: bool = False
    stall_mid_stream: float = 0.0
    malformed_json: bool = False
    empty: bool = False
    confidence: float | None = None
    hold_after_first: bool = False
    chunk_interval: float | None = None

    @property
    def is_empty(self) -> bool:
        return self == FaultSpec()

    @property
    def mid_body(self) -> bool:
        """True when something happens after the headers, inside the body."""
        return (
            self.first_byte_delay > 0
            or self.reset_mid_stream
            or self.stall_mid_stream > 0
            or self.hold_after_first
        )

    def combine(self, other: FaultSpec) -> FaultSpec:
        """Stack two specs: delays add up, flags are or-ed, and for single values (`status`,
        `retry_after`, `confidence`, `chunk_interval`) `self` wins when it sets them. A pacing
        is a rate, not a delay: two of them do not add up."""
        return FaultSpec(
            latency=self.latency + other.latency,
            hang=self.hang or other.hang,
            status=self.status if self.status is not None else other.status,
            retry_after=self.retry_after if self.retry_after is not None else other.retry_after,
            reset=self.reset or other.reset,
            first_byte_delay=self.first_byte_delay + other.first_byte_delay,
            reset_mid_stream=self.reset_mid_stream or other.reset_mid_stream,
            stall_mid_stream=self.stall_mid_stream + other.stall_mid_stream,
            malformed_json=self.malformed_json or other.malformed_json,
            empty=self.empty or other.empty,
            confidence=self.confidence if self.confidence is not None else other.confidence,
            hold_after_first=self.hold_after_first or other.hold_after_first,
            chunk_interval=(
                self.chunk_interval if self.chunk_interval is not None else other.chunk_interval
            ),
        )

    def __str__(self) -> str:
        """The canonical SPEC text; `parse_spec(str(spec)) == spec`."""
        items: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if f.name in _FLAGS:
                items.append(f.name)
            elif f.name in _DURATIONS:
                items.append(f"{f.name}={format_duration(value)}")
            else:
                items.append(
                    f"{f.name}={value:g}" if isinstance(value, float) else f"{f.name}={value}"
                )
        return ",".join(items)


def _parse_item(name: str, value: str | None, item: str) -> dict[str, Any]:
    if name not in FAULT_NAMES:
        known = ", ".join(FAULT_NAMES)
        raise FaultSpecError(f"unknown fault {name!r} in {item!r}; known faults: {known}", item)
    if name in _FLAGS:
        if value is not None:
            raise FaultSpecError(f"fault {name!r} takes no value (got {item!r})", item)
        return {name: True}
    if value is None or value == "":
        raise FaultSpecError(f"fault {name!r} needs a value: {FAULT_NAMES[name]}", item)
    if name in _DURATIONS:
        try:
            return {name: parse_duration(value)}
        except ValueError as exc:
            raise FaultSpecError(f"{item!r}: {exc}", item) from None
    if name == "status":
        if not value.isdigit() or not 100 <= int(value) <= 599:
            raise FaultSpecError(f"{item!r}: status must be an HTTP status 100-599", item)
        return {name: int(value)}
    # confidence
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0.0 <= number <= 1.0:
        raise FaultSpecError(f"{item!r}: confidence must be a number from 0 to 1", item)
    return {name: number}


def parse_spec(text: str) -> FaultSpec:
    """Parse `latency=300ms,status=503`. Whitespace around items is ignored, empty items are
    skipped, an item given twice is an error (which one would win?)."""
    values: dict[str, Any] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        parsed = _parse_item(name, value.strip() if sep else None, item)
        if name in values:
            raise FaultSpecError(f"fault {name!r} is given more than once", item)
        values.update(parsed)
    return replace(FaultSpec(), **values)


@dataclass
class ActiveFault:
    """One globally registered fault and what is left of it."""

    id: int
    spec: FaultSpec
    remaining: int | None = None
    until: float | None = None
    rate: float | None = None
    applied: int = 0

    def expired(self, now: float) -> bool:
        return (self.remaining is not None and self.remaining <= 0) or (
            self.until is not None and now >= self.until
        )

    def describe(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "spec": str(self.spec), "applied": self.applied}
        if self.remaining is not None:
            out["remaining"] = self.remaining
        if self.until is not None:
            out["seconds_left"] = round(max(0.0, self.until - now), 3)
        if self.rate is not None:
            out["rate"] = self.rate
        return out


_SCHEDULE_KEYS = frozenset({"spec", "count", "seconds", "rate"})


@dataclass
class FaultSchedule:
    """Global faults, stacked in the order they were added.

    `now` is a monotonic clock in seconds and `rng` decides `rate` faults; both are injected.
    """

    now: Callable[[], float]
    rng: random.Random = field(default_factory=random.Random)
    _faults: list[ActiveFault] = field(default_factory=list, init=False)
    _next_id: int = field(default=1, init=False)

    def add(
        self,
        spec: FaultSpec,
        *,
        count: int | None = None,
        seconds: float | None = None,
        rate: float | None = None,
    ) -> ActiveFault:
        """Register `spec` for the next `count` requests it applies to, for `seconds`, and/or with
        probability `rate` per request. At least one limit is required; they combine."""
        if spec.is_empty:
            raise FaultSpecError("spec must name at least one fault", "spec")
        if count is None and seconds is None and rate is None:
            raise FaultSpecError("give at least one of count, seconds or rate", "count")
        if count is not None and count < 1:
            raise FaultSpecError("count must be an integer >= 1", "count")
        if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
            raise FaultSpecError("seconds must be a number > 0", "seconds")
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise FaultSpecError("rate must be a number from 0 to 1", "rate")
        fault = ActiveFault(
            id=self._next_id,
            spec=spec,
            remaining=count,
            until=None if seconds is None else self.now() + seconds,
            rate=rate,
        )
        self._next_id += 1
        self._faults.append(fault)
        return fault

    def add_from_json(self, payload: object) -> ActiveFault:
        """Validate a `POST /_demo/faults` body (`{"spec": ..., "count"|"seconds"|"rate": ...}`)."""
        if not isinstance(payload, dict):
            raise FaultSpecError(
                'body must be a JSON object like {"spec": "status=503", "count": 1}'
            )
        unknown = sorted(set(payload) - _SCHEDULE_KEYS)
        if unknown:
            raise FaultSpecError(
                f"unknown field(s) {', '.join(map(repr, unknown))}; "
                "allowed: spec, count, seconds, rate",
                unknown[0],
            )
        spec_text = payload.get("spec")
        if not isinstance(spec_text, str):
            raise FaultSpecError("spec must be a string like 'status=503'", "spec")
        count = payload.get("count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise FaultSpecError("count must be an integer >= 1", "count")
        return self.add(
            parse_spec(spec_text),
            count=count,
            seconds=_number(payload.get("seconds"), "seconds"),
            rate=_number(payload.get("rate"), "rate"),
        )

    def draw(self) -> FaultSpec:
        """The combined spec for one request; consumes `count` faults that apply."""
        now = self.now()
        self._faults = [f for f in self._faults if not f.expired(now)]
        combined = FaultSpec()
        for fault in self._faults:
            if fault.rate is not None and self.rng.random() >= fault.rate:
                continue
            if fault.remaining is not None:
                fault.remaining -= 1
            fault.applied += 1
            combined = combined.combine(fault.spec)
        self._faults = [f for f in self._faults if not f.expired(now)]
        return combined

    def active(self) -> list[dict[str, Any]]:
        now = self.now()
        self._faults = [f for f in self._faults if not f.expired(now)]
        return [f.describe(now) for f in self._faults]

    def clear(self) -> int:
        """Remove every fault; returns how many were active."""
        removed = len(self.active())
        self._faults.clear()
        return removed


def _number(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultSpecError(f"{name} must be a number", name)
    return float(value)
