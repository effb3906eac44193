"""The open-loop load generator of the benchmark: a fixed request rate, latency from the
*scheduled* send time, late sends counted, over a minimal keep-alive HTTP/1.1 client.

Open loop means the schedule never waits for answers: request i is due at `start + i / rate`
whatever happened to request i-1, so a slow server shows up as latency instead of silently
lowering the rate (coordinated omission). Each request's latency runs from its scheduled time, so
a generator that falls behind is charged for it; how late each send left is recorded too, and
sends later than `LATE_AFTER` are counted, so a saturated generator is visible in the report.

The client is a small `asyncio.Protocol` (no aiohttp on the measuring path): one request at a
time per pooled keep-alive connection, pre-encoded request bytes, a tiny response parser
(Content-Length, chunked, close-delimited) and timestamps taken in `data_received`. For
`text/event-stream` answers it also records when the first event arrived and the gaps between
events; an event is a block with a `data` field, so a proxy's comment lines do not count. The
event loop's timer has millisecond granularity, so every send is up to ~1 ms late;
that is the same for every variant, and `LATE_AFTER` is set above it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "LATE_AFTER",
    "Client",
    "LoadResult",
    "Request",
    "Sample",
    "percentile",
    "run_open_loop",
]

#: A send this much after its scheduled time counts as late (timer granularity is ~1 ms).
LATE_AFTER = 0.002

perf = time.perf_counter


@dataclass(frozen=True)
class Request:
    """One request, encoded once: method, path, headers and body."""

    method: str = "GET"
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def encode(self, authority: str) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {authority}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


@dataclass(slots=True)
class Sample:
    """What one request saw. Times are seconds; `latency` runs from the scheduled send time."""

    scheduled: float
    late: float = 0.0
    latency: float = math.nan
    status: int = 0
    error: str | None = None
    failure_mode: str | None = None
    first_event: float | None = None
    events: int = 0
    max_gap: float = 0.0
    last_event: float | None = None
    first_read_events: int = 0  # events completed by the read that completed the first one

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status < 300


@dataclass
class LoadResult:
    """One run: every sample plus the generator's own cost."""

    rate: float
    duration: float
    samples: list[Sample]
    wall: float
    generator_cpu: float  # CPU seconds of this process during the run

    @property
    def errors(self) -> int:
        return sum(1 for s in self.samples if not s.ok)

    @property
    def late_sends(self) -> int:
        return sum(1 for s in self.samples if s.late > LATE_AFTER)

    def latencies(self, predicate: Callable[[Sample], bool] | None = None) -> list[float]:
        return sorted(
            s.latency
            for s in self.samples
            if not math.isnan(s.latency) and (predicate is None or predicate(s))
        )


def _has_data(block: bytes) -> bool:
    return any(line == b"data" or line.startswith(b"data:") for line in block.split(b"\n"))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.sample: Sample | None = None
        self.t0 = 0.0
        self.on_done: Callable[[Sample], None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self._reset_parser()

    def _reset_parser(self) -> None:
        self.buf = bytearray()
        self.head_done = False
        self.length: int | None = None
        self.chunked = False
        self.until_close = False
        self.keep_alive = True
        self.sse = False
        self.body_seen = 0
        self.chunk_left = 0  # bytes of the current chunk still to come (+2 for its CRLF)
        self.sse_block = b""  # the SSE block still open at the end of the last payload

    # asyncio callbacks --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.sample is not None:
            if self.until_close and self.head_done:
                self._finish(None)
            else:
                self._finish("reset" if exc else "closed")
        self.client._forget(self)

    def data_received(self, data: bytes) -> None:
        now = perf()
        if self.sample is None:
            return  # unsolicited bytes after a finished answer: ignore
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(bytes(self.buf[:end]))
            del self.buf[: end + 4]
            self.head_done = True
        self._body(now)

    # parsing --------------------------------------------------------------------------------
    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        assert self.sample is not None
        try:
            self.sample.status = int(parts[1])
        except (IndexError, ValueError):
            self.sample.status = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            val = value.strip()
            if key == b"content-length":
                self.length = int(val)
            elif key == b"transfer-encoding" and b"chunked" in val.lower():
                self.chunked = True
            elif key == b"connection" and val.lower() == b"close":
                self.keep_alive = False
            elif key == b"content-type" and val.lower().startswith(b"text/event-stream"):
                self.sse = True
            elif key == b"x-sidecar-failure-mode":
                self.sample.failure_mode = val.decode("latin-1")
        if self.chunked:
            self.length = None
        elif self.length is None:
            if self.sample.status in (204, 304) or 100 <= self.sample.status < 200:
                self.length = 0
            else:
                self.until_close = True
                self.keep_alive = False

    def _events(self, payload: bytes, now: float) -> None:
        """Count SSE events completed in `payload`: blank-line-terminated blocks with a `data`
        field. A comment block (`: ...`, such as the sidecar's closing outcome line) is none."""
        blocks = (self.sse_block + payload).split(b"\n\n")
        self.sse_block = blocks.pop()
        count = sum(1 for block in blocks if _has_data(block))
        if not count:
            return
        s = self.sample
        assert s is not None
        at = now - s.scheduled
        if s.first_event is None:
            s.first_event = at
        elif s.last_event is not None:
            s.max_gap = max(s.max_gap, at - s.last_event)
        if at == s.first_event:  # one read can hold several chunks, each counted by a call
            s.first_read_events += count
        s.last_event = at
        s.events += count

    def _body(self, now: float) -> None:
        if self.chunked:
            self._chunked(now)
            return
        if self.buf:
            if self.sse:
                self._events(bytes(self.buf), now)
            self.body_seen += len(self.buf)
            self.buf.clear()
        if self.length is not None and self.body_seen >= self.length:
            self._finish(None)

    def _chunked(self, now: float) -> None:
        buf = self.buf
        while True:
            if self.chunk_left > 0:
                take = min(self.chunk_left, len(buf))
                if take == 0:
                    return
                data_end = max(0, min(take, self.chunk_left - 2))
                if self.sse and data_end:
                    self._events(bytes(buf[:data_end]), now)
                del buf[:take]
                self.chunk_left -= take
                continue
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(buf[:line_end]).split(b";")[0], 16)
            if size == 0:
                # No trailers are expected; the terminating CRLF follows the zero chunk.
                if len(buf) < line_end + 4:
                    return
                del buf[: line_end + 4]
                self._finish(None)
                return
            del buf[: line_end + 2]
            self.chunk_left = size + 2

    def _finish(self, error: str | None) -> None:
        sample, self.sample = self.sample, None
        if sample is None:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        sample.latency = perf() - sample.scheduled
        if error is not None:
            sample.error = error
        reusable = error is None and self.keep_alive and not self.closed and not self.buf
        self._reset_parser()
        done = self.on_done
        self.on_done = None
        if reusable:
            self.client._release(self)
        elif self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        if done is not None:
            done(sample)

    # sending ----------------------------------------------------------------------------------
    def send(self, payload: bytes, sample: Sample, timeout: float) -> None:
        assert self.transport is not None
        self.sample = sample
        self.on_done = self.client._complete
        self.timer = asyncio.get_running_loop().call_later(timeout, self._timeout)
        self.transport.write(payload)

    def _timeout(self) -> None:
        self.timer = None
        if self.sample is not None:
            self._finish("timeout")


@dataclass
class Client:
    """A pool of keep-alive connections to one `host:port`, used by one run at a time."""

    host: str
    port: int
    timeout: float = 10.0
    max_connections: int = 4096
    idle: list[_Conn] = field(default_factory=list)
    all: set[_Conn] = field(default_factory=set)
    pending: int = 0
    samples: list[Sample] = field(default_factory=list)
    _waiting: list[tuple[bytes, Sample]] = field(default_factory=list)
    _drained: asyncio.Event | None = None

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        self.all.add(proto)
        return proto

    async def warm(self, count: int) -> None:
        """Open `count` idle connections ahead of a run (at most `max_connections`)."""
        want = min(count, self.max_connections) - len(self.all)
        if want > 0:
            conns = await asyncio.gather(*(self._connect() for _ in range(want)))
            self.idle.extend(conns)

    def submit(self, payload: bytes, sample: Sample) -> None:
        """Send now on an idle connection, or on a new one; past the cap, queue."""
        self.pending += 1
        sample.late = perf() - sample.scheduled
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                conn.send(payload, sample, self.timeout)
                return
        if len(self.all) + len(self._waiting) < self.max_connections:
            asyncio.get_running_loop().create_task(self._send_new(payload, sample))
        else:
            self._waiting.append((payload, sample))

    async def _send_new(self, payload: bytes, sample: Sample) -> None:
        try:
            conn = await asyncio.wait_for(self._connect(), self.timeout)
        except (OSError, TimeoutError) as exc:
            sample.latency = perf() - sample.scheduled
            sample.error = f"connect: {type(exc).__name__}"
            self._complete(sample)
            return
        sample.late = max(sample.late, 0.0)
        conn.send(payload, sample, self.timeout)

    def _release(self, conn: _Conn) -> None:
        if self._waiting:
            payload, sample = self._waiting.pop(0)
            conn.send(payload, sample, self.timeout)
        else:
            self.idle.append(conn)

    def _forget(self, conn: _Conn) -> None:
        self.all.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if self._waiting and len(self.all) < self.max_connections:
            payload, sample = self._waiting.pop(0)
            asyncio.get_running_loop().create_task(self._send_new(payload, sample))

    def _complete(self, sample: Sample) -> None:
        self.pending -= 1
        self.samples.append(sample)
        if self.pending == 0 and self._drained is not None:
            self._drained.set()

    async def drain(self, timeout: float) -> None:
        """Wait until every submitted request finished (each has its own timeout anyway)."""
        if self.pending == 0:
            return
        self._drained = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)
        self._drained = None

    def close(self) -> None:
        for conn in list(self.all):
            if conn.transport is not None and not conn.closed:
                conn.transport.close()
        self.idle.clear()


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


async def run_open_loop(
    host: str,
    port: int,
    request: Request,
    *,
    rate: float,
    duration: float,
    timeout: float = 10.0,
    warm_connections: int | None = None,
    max_connections: int = 4096,
    on_tick: Callable[[float], None] | None = None,
) -> LoadResult:
    """Send `rate * duration` requests at fixed intervals and wait for every answer.

    `on_tick(elapsed)` is called after each send (the flapping scenario uses it to follow the
    fault schedule)."""
    client = Client(host, port, timeout=timeout, max_connections=max_connections)
    payload = request.encode(client.authority)
    try:
        await client.warm(warm_connections if warm_connections is not None else 8)
        count = int(rate * duration)
        interval = 1.0 / rate
        cpu0 = _cpu_seconds()
        start = perf() + 0.01
        for i in range(count):
            due = start + i * interval
            delay = due - perf()
            if delay > 0:
                await asyncio.sleep(delay)
            client.submit(payload, Sample(scheduled=due))
            if on_tick is not None:
                on_tick(due - start)
        await client.drain(timeout + 5.0)
        wall = perf() - start
        cpu = _cpu_seconds() - cpu0
        # Whatever did not finish (it should not happen: each request has a timeout).
        return LoadResult(rate, duration, list(client.samples), wall, cpu)
    finally:
        client.close()
