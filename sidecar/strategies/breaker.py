"""Circuit breaker per upstream, driven explicitly (DESIGN.md's pybreaker traps).

pybreaker's `call()` counts cancellation as failure, hides the tripping call's real failure behind
`CircuitBreakerError`, lets every concurrent call through while half-open and reads the wall
clock. So it is used only as the state store (`CircuitMemoryStorage`, swappable for shared state);
this module asks for admission, lets the attempt run, and records success, failure or nothing.

Sits inside retry (every attempt counts, an open circuit is never retried) and outside the
attempt timeout (timeouts trip it). It opens on N consecutive failures or on a failure ratio over a
sliding window once a minimum number of calls is seen; the open duration doubles on repeated
opens (with jitter) up to a cap; half-open admits only the configured number of probes.

Every admission hands out an `Admission` naming the breaker's period (a generation that moves on
each open, half-open and close). An outcome is applied only in the period that admitted the call:
a probe that outlives its half-open period (the circuit reopened, by a replica, an operator or a
timer, and half-opened again) neither closes nor reopens the new period nor frees its probe slot,
and a call admitted in an earlier closed period does not count towards a later one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pybreaker

from sidecar.classify import classify_status, counts_against_upstream
from sidecar.clock import Clock
from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.pipeline import Handler, ProxyRequest, ProxyResponse

__all__ = ["Admission", "BreakerConfig", "BreakerStrategy", "CircuitBreaker", "State"]

_SLOTS = 10


class State:
    CLOSED = pybreaker.STATE_CLOSED  # "closed"
    OPEN = pybreaker.STATE_OPEN  # "open"
    HALF_OPEN = pybreaker.STATE_HALF_OPEN  # "half-open"


STATE_VALUE = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}


@dataclass(frozen=True)
class BreakerConfig:
    enabled: bool = True
    consecutive_failures: int = 5
    failure_ratio: float = 0.5
    min_calls: int = 20
    window: float = 30.0
    open_for: float = 5.0
    open_for_max: float = 60.0
    jitter: float = 0.1
    half_open_probes: int = 1
    #: Redis URL the open/closed state is shared through (None: local only). The breaker itself
    #: never talks to it; `sidecar.transport.breaker_sync` does, in the background.
    storage: str | None = None
    storage_prefix: str = "sidecar:breaker:"


@dataclass(frozen=True, slots=True)
class Admission:
    """A call let through by `CircuitBreaker.admit`, handed back with its outcome."""

    #: The breaker's period when the call was admitted; outcomes of an older period are dropped.
    generation: int
    #: True when the call is one of a half-open period's probes.
    probe: bool


TransitionListener = Callable[["CircuitBreaker", str, str, "RequestContext | None"], None]


class CircuitBreaker:
    """State of one upstream's circuit. All methods are synchronous and run on the event loop."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        storage: pybreaker.CircuitMemoryStorage | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random()
        self.storage = storage or pybreaker.CircuitMemoryStorage(State.CLOSED)
        self._slot_len = config.window / _SLOTS
        self._calls = [0] * _SLOTS
        self._failures = [0] * _SLOTS
        self._slot_index = [-1] * _SLOTS
        self.open_until = 0.0
        self.opened_at_mono: float | None = None
        self.first_opened_at_mono: float | None = None
        self.reopens = 0
        self.probes_in_flight = 0
        #: The current period (closed, open or half-open); see `Admission`.
        self.generation = 0
        self.open_count = 0
        self.transitions: dict[str, int] = {State.OPEN: 0, State.HALF_OPEN: 0, State.CLOSED: 0}
        self.last_recovery_seconds: float | None = None
        self.listeners: list[TransitionListener] = []
        #: True while the circuit is open because another replica said so (`adopt_open`).
        self.open_adopted = False
        #: Shared-state status (kept up to date by the breaker sync), shown in the snapshot.
        self.sync: dict[str, Any] | None = None

    # -- state ---------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        state: str = self.storage.state
        return state

    def _set_state(self, new: str, ctx: RequestContext | None) -> None:
        old = self.state
        if old == new:
            return
        self.storage.state = new
        self.transitions[new] += 1
        event = {
            State.OPEN: "circuit_opened",
            State.HALF_OPEN: "circuit_half_open",
            State.CLOSED: "circuit_closed",
        }[new]
        attrs: dict[str, Any] = {"upstream": self.name, "from": old}
        if new == State.OPEN:
            attrs["open_for"] = round(self.open_until - self.clock.monotonic(), 3)
        if new == State.CLOSED and self.last_recovery_seconds is not None:
            attrs["recovery_seconds"] = round(self.last_recovery_seconds, 3)
        if ctx is not None:
            ctx.emit(event, **attrs)
        for listener in self.listeners:
            listener(self, old, new, ctx)

    def _open(self, ctx: RequestContext | None) -> None:
        now = self.clock.monotonic()
        base = min(self.config.open_for * (2**self.reopens), self.config.open_for_max)
        duration = base + self.rng.uniform(0, self.config.jitter * base)
        self.open_until = now + duration
        self.opened_at_mono = now
        if self.first_opened_at_mono is None:
            self.first_opened_at_mono = now
        self.reopens += 1
        self.open_count += 1
        self._new_period()
        self.open_adopted = False
        self.storage.opened_at = dt.datetime.fromtimestamp(self.clock.wall(), tz=dt.UTC)
        self._set_state(State.OPEN, ctx)

    def adopt_open(self, until: float) -> bool:
        """Another replica opened this circuit until `until` (our monotonic clock): fail fast
        here too, without counting it as an open of our own (the backoff does not grow). Only
        opens or extends an open; a half-open probe in flight finds the circuit open and is
        ignored. Returns True when something changed."""
        now = self.clock.monotonic()
        if not self.config.enabled or until <= now:
            return False
        if self.state == State.OPEN:
            if until <= self.open_until:
                return False
            self.open_until = until
            return True
        self.open_until = until
        self.opened_at_mono = now
        if self.first_opened_at_mono is None:
            self.first_opened_at_mono = now
        self._new_period()
        self.open_adopted = True
        self.storage.opened_at = dt.datetime.fromtimestamp(self.clock.wall(), tz=dt.UTC)
        self._set_state(State.OPEN, None)
        return True

    def hasten_probe(self) -> bool:
        """Another replica's probe succeeded: end our open period now, so the next call probes
        (our own probe still decides whether this replica closes)."""
        now = self.clock.monotonic()
        if self.state != State.OPEN or self.open_until <= now:
            return False
        self.open_until = now
        return True

    def _close(self, ctx: RequestContext | None) -> None:
        now = self.clock.monotonic()
        if self.first_opened_at_mono is not None:
            self.last_recovery_seconds = now - self.first_opened_at_mono
        self.first_opened_at_mono = None
        self.opened_at_mono = None
        self.reopens = 0
        self._new_period()
        self.open_adopted = False
        self.storage.reset_counter()
        self._reset_window()
        self._set_state(State.CLOSED, ctx)

    def _new_period(self) -> None:
        """Calls admitted before now no longer move the state, nor hold or free a probe slot."""
        self.generation += 1
        self.probes_in_flight = 0

    # -- window --------------------------------------------------------------------------------
    def _reset_window(self) -> None:
        self._calls = [0] * _SLOTS
        self._failures = [0] * _SLOTS
        self._slot_index = [-1] * _SLOTS

    def _slot(self, now: float) -> int:
        absolute = math.floor(now / self._slot_len)
        i = absolute % _SLOTS
        if self._slot_index[i] != absolute:
            self._slot_index[i] = absolute
            self._calls[i] = 0
            self._failures[i] = 0
        return i

    def window_counts(self) -> tuple[int, int]:
        current = math.floor(self.clock.monotonic() / self._slot_len)
        calls = failures = 0
        for i in range(_SLOTS):
            if current - self._slot_index[i] < _SLOTS:
                calls += self._calls[i]
                failures += self._failures[i]
        return calls, failures

    # -- the protocol: admit, then record exactly one of success / failure / ignored ------------
    def admit(self, ctx: RequestContext | None = None) -> Admission:
        """Let a call through (a probe while half-open); raise `circuit_open` when refused. The
        returned `Admission` goes back to exactly one of the `record_*` methods."""
        if not self.config.enabled:
            return Admission(self.generation, probe=False)
        state = self.state
        now = self.clock.monotonic()
        if state == State.OPEN:
            if now < self.open_until:
                raise self._refusal(self.open_until - now)
            self._new_period()
            self._set_state(State.HALF_OPEN, ctx)
            state = State.HALF_OPEN
        if state == State.HALF_OPEN:
            if self.probes_in_flight >= self.config.half_open_probes:
                raise self._refusal(max(self.config.open_for * 0.1, 0.001))
            self.probes_in_flight += 1
            return Admission(self.generation, probe=True)
        return Admission(self.generation, probe=False)

    def _current(self, admission: Admission) -> bool:
        """Whether `admission` belongs to the period the breaker is in now; a current probe gives
        its slot back here, a stale one never does (the slot it held belonged to its period)."""
        if not self.config.enabled or admission.generation != self.generation:
            return False
        if admission.probe:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)
        return True

    def _refusal(self, retry_after: float) -> SidecarError:
        return SidecarError(
            FailureMode.CIRCUIT_OPEN,
            f"circuit for upstream {self.name!r} is open; not calling it",
            retry_after=retry_after,
        )

    def record_success(self, admission: Admission, ctx: RequestContext | None = None) -> None:
        if not self._current(admission):
            return
        now = self.clock.monotonic()
        if admission.probe:
            if self.state == State.HALF_OPEN:
                self._close(ctx)
            return
        if self.state == State.CLOSED:
            self._calls[self._slot(now)] += 1
            self.storage.reset_counter()

    def record_failure(self, admission: Admission, ctx: RequestContext | None = None) -> None:
        if not self._current(admission):
            return
        now = self.clock.monotonic()
        if admission.probe:
            if self.state == State.HALF_OPEN:
                self._open(ctx)
            return
        if self.state != State.CLOSED:
            return
        i = self._slot(now)
        self._calls[i] += 1
        self._failures[i] += 1
        self.storage.increment_counter()
        calls, failures = self.window_counts()
        if self.storage.counter >= self.config.consecutive_failures or (
            calls >= self.config.min_calls and failures / calls >= self.config.failure_ratio
        ):
            self._open(ctx)

    def record_ignored(self, admission: Admission) -> None:
        """The call ended without saying anything about the upstream (client cancelled)."""
        self._current(admission)

    # -- operator actions ---------------------------------------------------------------------
    def force(self, action: str) -> None:
        if action == "open":
            self._open(None)
        elif action == "close":
            self._close(None)
        elif action == "reset":
            self._close(None)
            self.open_count = 0
            self.last_recovery_seconds = None
        else:
            raise ValueError(f"unknown breaker action {action!r}; use open, close or reset")

    def snapshot(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        wall = self.clock.wall()
        calls, failures = self.window_counts()
        state = self.state
        next_probe = None
        if state == State.OPEN:
            next_probe = wall + max(0.0, self.open_until - now)
        return {
            "upstream": self.name,
            "state": state,
            "enabled": self.config.enabled,
            "consecutive_failures": self.storage.counter,
            "window_calls": calls,
            "window_failures": failures,
            "opened_at": self.storage.opened_at.isoformat()
            if state != State.CLOSED and self.storage.opened_at
            else None,
            "next_probe_at": dt.datetime.fromtimestamp(next_probe, tz=dt.UTC).isoformat()
            if next_probe
            else None,
            "next_probe_in": round(max(0.0, self.open_until - now), 3) if next_probe else None,
            "probes_in_flight": self.probes_in_flight,
            "open_count": self.open_count,
            "transitions": dict(self.transitions),
            "last_recovery_seconds": self.last_recovery_seconds,
            **({"shared": {**self.sync, "open_adopted": self.open_adopted}} if self.sync else {}),
        }


class BreakerStrategy:
    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    async def __call__(
        self, request: ProxyRequest, ctx: RequestContext, next: Handler
    ) -> ProxyResponse:
        breaker = self.breaker
        try:
            admission = breaker.admit(ctx)
        finally:
            # Set even when admission fails fast (circuit_open): logs and failure records say so.
            ctx.breaker_state = breaker.state
        try:
            response = await next(request, ctx)
        except SidecarError as err:
            if counts_against_upstream(err.mode):
                breaker.record_failure(admission, ctx)
            else:
                breaker.record_ignored(admission)
            raise
        except asyncio.CancelledError:
            breaker.record_ignored(admission)
            raise
        except Exception:
            breaker.record_failure(admission, ctx)
            raise
        finally:
            # The state after this call, on every path (a tripping error included).
            ctx.breaker_state = breaker.state
        if counts_against_upstream(classify_status(response.status)):
            breaker.record_failure(admission, ctx)
        else:
            breaker.record_success(admission, ctx)
        ctx.breaker_state = breaker.state
        return response
