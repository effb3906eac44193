"""Bad-input corpus against the real `sidecar run`: hostile or broken requests, each sent as exact
bytes over a raw socket.

One sidecar serves the whole module. Its only upstream is a `RecordingUpstream` that keeps every
byte it receives; a second one, the decoy, is named in targets and `Host` headers and must never see
a connection. Each case asserts the status the caller gets and what reached the upstream: nothing
for a refused request; for one the sidecar may forward, exactly one well-framed request per upstream
connection (so no smuggled second head), without the forbidden headers and without the planted
`SMUGGLED` marker outside the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass

import pytest
import pytest_asyncio

from tests.conftest import simple_policy, write_policy
from tests.support.processes import RunningProcess, sidecar_cmd, start_process
from tests.support.upstreams import RecordingUpstream

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

MARKER = b"SMUGGLED"
WAIT = 5.0
# Bodies past this stream upstream before the caller has finished sending them.
REPLAY_LIMIT = 4096

CLIENT_ERROR = range(400, 500)
NOT_IMPLEMENTED = (501,)
# aiohttp's parser refuses a garbled version with 400; a well-formed one other than HTTP/1.x
# reaches the handler, which answers 505 HTTP Version Not Supported.
BAD_VERSION = (400, 505)
OK = (200,)

_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_FIELD_VALUE = re.compile(rb"^[\x21-\x7e\x80-\xff]?([\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?$")
_REQUEST_LINE = re.compile(rb"^([A-Z]+) (/(?!/)[\x21-\x7e]*) HTTP/1\.1$")
_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"upgrade",
    b"http2-settings",
}


@dataclass
class Edge:
    """The sidecar under test, its recording upstream and the decoy."""

    rp: RunningProcess
    upstream: RecordingUpstream
    decoy: RecordingUpstream
    host: str
    port: int

    @property
    def decoy_authority(self) -> bytes:
        return f"127.0.0.1:{self.decoy.port}".encode()

    @property
    def upstream_authority(self) -> bytes:
        return f"127.0.0.1:{self.upstream.port}".encode()


@dataclass
class Forwarded:
    """One request as the upstream received it, parsed strictly."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    @property
    def names(self) -> set[bytes]:
        return {n.lower() for n, _ in self.headers}


ForwardCheck = Callable[[Forwarded], None]


@dataclass(frozen=True)
class Case:
    raw: bytes
    statuses: Collection[int]
    # Set when the request is acceptable: what the single forwarded request must look like.
    forwarded: ForwardCheck | None = None
    # The connection stays open after the answer (no `Connection: close` allowed): read the
    # head only, then close.
    head_only: bool = False
    # The handler answered (not aiohttp's parser): the answer carries the sidecar's headers.
    handler: bool = False


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def edge(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edge]:
    upstream = await RecordingUpstream().start()
    decoy = await RecordingUpstream().start()
    tmp = tmp_path_factory.mktemp("bad_input")
    policy = simple_policy(upstream.url, retry={"replay_limit": REPLAY_LIMIT})
    path = write_policy(tmp, policy)
    args = sidecar_cmd("run", "--policy", str(path), "--port", "0", "--admin-port", "0")
    rp = await asyncio.to_thread(start_process, args, env={"SIDECAR_STATE_DIR": str(tmp / "state")})
    host, port = rp.ready["proxy"].rsplit(":", 1)
    try:
        yield Edge(rp, upstream, decoy, host, int(port))
    finally:
        await asyncio.to_thread(rp.stop)
        await upstream.stop()
        await decoy.stop()


@pytest.fixture
def fresh(edge: Edge) -> Edge:
    """The module's sidecar with the upstream's record cleared for this case."""
    edge.upstream.received.clear()
    edge.upstream.connections = 0
    return edge


async def send(edge: Edge, raw: bytes, *, head_only: bool = False) -> bytes:
    """Send `raw` on a fresh connection; read the answer to EOF (or its head only)."""
    reader, writer = await asyncio.open_connection(edge.host, edge.port)
    data = b""
    try:
        writer.write(raw)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(WAIT):
            while not (head_only and b"\r\n\r\n" in data):
                try:
                    chunk = await reader.read(65536)
                except ConnectionError:
                    break
                if not chunk:
                    break
                data += chunk
    finally:
        writer.close()
    return data


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/"), f"no HTTP answer: {answer[:200]!r}"
    return int(answer.split(b" ", 2)[1])


def parse_chunked(data: bytes) -> tuple[bytes, bytes]:
    """Strict chunked decoding: (body, bytes left after the last chunk and trailer)."""
    body = b""
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        assert sep, "truncated chunk size line"
        assert re.fullmatch(rb"[0-9a-fA-F]{1,16}", size_line), f"bad chunk size {size_line!r}"
        size = int(size_line, 16)
        if size == 0:
            assert data.startswith(b"\r\n"), "the upstream got a chunked trailer"
            return body, data[2:]
        assert data[size : size + 2] == b"\r\n", "chunk data not followed by CRLF"
        body += data[:size]
        data = data[size + 2 :]


def parse_forwarded(edge: Edge, conn: bytes) -> Forwarded:
    """One upstream connection's bytes: exactly one well-formed, well-framed request."""
    head, sep, rest = conn.partition(b"\r\n\r\n")
    assert sep, f"incomplete request head: {conn[:300]!r}"
    line, *header_lines = head.split(b"\r\n")
    match = _REQUEST_LINE.match(line)
    assert match, f"bad request line upstream: {line!r}"
    headers = []
    for header_line in header_lines:
        name, colon, value = header_line.partition(b":")
        assert colon and _TOKEN.match(name), f"bad header line upstream: {header_line!r}"
        value = value.strip(b" \t")
        assert _FIELD_VALUE.match(value), f"bad header value upstream: {header_line!r}"
        headers.append((name, value))
    fwd = Forwarded(match.group(1), match.group(2), headers, b"")
    assert MARKER not in head, f"the marker reached the upstream in the head: {head!r}"
    assert fwd.values(b"host") == [edge.upstream_authority]
    assert not {n for n in fwd.names if n.startswith(b"x-sidecar-")}, head
    assert not fwd.names & _HOP_BY_HOP, head
    lengths = fwd.values(b"content-length")
    codings = fwd.values(b"transfer-encoding")
    assert not (lengths and codings), f"both Content-Length and Transfer-Encoding: {head!r}"
    assert len(lengths) <= 1 and len(codings) <= 1, f"duplicated framing headers: {head!r}"
    if codings:
        assert codings == [b"chunked"], head
        fwd.body, after = parse_chunked(rest)
    elif lengths:
        assert lengths[0].isdigit(), head
        size = int(lengths[0])
        fwd.body, after = rest[:size], rest[size:]
        assert len(fwd.body) == size, "the upstream got a short body"
    else:
        after = rest
    assert after == b"", f"bytes after the request (a second request head?): {after[:200]!r}"
    return fwd


def body_is(expected: bytes) -> ForwardCheck:
    def check(fwd: Forwarded) -> None:
        assert fwd.body == expected

    return check


def without(*names: bytes, body: bytes = b"") -> ForwardCheck:
    def check(fwd: Forwarded) -> None:
        assert not fwd.names & {n.lower() for n in names}, fwd.headers
        assert fwd.body == body

    return check


def req(*lines: bytes, body: bytes = b"") -> bytes:
    """A request from exact header lines (CRLF-joined) and an exact body."""
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# Host names no real authority so the bytes (and any declared length) do not depend on ports.
SMUGGLED_HEAD = b"GET /SMUGGLED HTTP/1.1\r\nHost: smuggled.invalid\r\n\r\n"
GZ_HELLO = gzip.compress(b"hello", mtime=0)
# Decoded, this is past the replay buffer, so it would stream with the declared length.
GZ_LARGE = gzip.compress(b"a" * (4 * REPLAY_LIMIT), mtime=0)

CASES = [
    # --- Content-Length and Transfer-Encoding together, and Content-Length games.
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Content-Length: 6",
                b"Transfer-Encoding: chunked",
                b"Connection: close",
                body=b"0\r\n\r\n" + SMUGGLED_HEAD,
            ),
            CLIENT_ERROR,
        ),
        id="cl-then-te",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: chunked",
                b"Content-Length: 4",
                b"Connection: close",
                body=b"%x\r\n" % len(SMUGGLED_HEAD) + SMUGGLED_HEAD + b"\r\n0\r\n\r\n",
            ),
            CLIENT_ERROR,
        ),
        id="te-then-cl",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Content-Length: 5",
                b"Content-Length: 5",
                b"Connection: close",
                body=b"hello",
            ),
            CLIENT_ERROR,
        ),
        id="cl-duplicate-same",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Content-Length: 5",
                b"Content-Length: %d" % (5 + len(SMUGGLED_HEAD)),
                b"Connection: close",
                body=b"hello" + SMUGGLED_HEAD,
            ),
            CLIENT_ERROR,
        ),
        id="cl-duplicate-different",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Content-Length: 5, 5",
                b"Connection: close",
                body=b"hello",
            ),
            CLIENT_ERROR,
        ),
        id="cl-list",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Content-Length: +5",
                b"Connection: close",
                body=b"hello",
            ),
            CLIENT_ERROR,
        ),
        id="cl-plus-sign",
    ),
    pytest.param(
        Case(
            req(b"POST /x HTTP/1.1", b"Host: x", b"Content-Length: -1", b"Connection: close"),
            CLIENT_ERROR,
        ),
        id="cl-negative",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Content-Length: 0x10",
                b"Connection: close",
                body=b"0123456789abcdef",
            ),
            CLIENT_ERROR,
        ),
        id="cl-hex",
    ),
    pytest.param(
        Case(
            req(b"POST /x HTTP/1.1", b"Host: x", b"Content-Length: ", b"Connection: close"),
            CLIENT_ERROR,
        ),
        id="cl-empty",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Content-Length: 99999999999999999999999999",
                b"Connection: close",
            ),
            CLIENT_ERROR,
        ),
        id="cl-overflow",
    ),
    pytest.param(
        # Parses, but is over max_body: 413 from the handler before any body byte is read.
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Content-Length: 1099511627776",
                b"Connection: close",
                body=MARKER,
            ),
            (413,),
            handler=True,
        ),
        id="cl-huge",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Content-Length : 5",
                b"Connection: close",
                body=b"hello",
            ),
            CLIENT_ERROR,
        ),
        id="cl-space-before-colon",
    ),
    # --- Bad chunk sizes and chunk framing.
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: chunked",
                b"Connection: close",
                body=b"zz\r\n" + MARKER + b"\r\n0\r\n\r\n",
            ),
            CLIENT_ERROR,
        ),
        id="chunk-size-not-hex",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: chunked",
                b"Connection: close",
                body=b"-8\r\n" + MARKER + b"\r\n0\r\n\r\n",
            ),
            CLIENT_ERROR,
        ),
        id="chunk-size-negative",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: chunked",
                b"Connection: close",
                body=b"1" + b"0" * 16 + b"8\r\n" + MARKER + b"\r\n0\r\n\r\n",
            ),
            CLIENT_ERROR,
        ),
        id="chunk-size-overflow",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: chunked",
                b"Connection: close",
                body=b"5\r\nhello" + SMUGGLED_HEAD + b"0\r\n\r\n",
            ),
            CLIENT_ERROR,
        ),
        id="chunk-data-missing-crlf",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: chunked",
                b"Connection: close",
                body=b"5\nhello\n0\n\n",
            ),
            CLIENT_ERROR,
        ),
        id="chunk-lines-bare-lf",
    ),
    pytest.param(
        # Trailer fields are not forwarded: neither the spoofed header nor a second framing.
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: chunked",
                b"Connection: close",
                body=b"5\r\nhello\r\n0\r\nX-Sidecar-Route: "
                + MARKER
                + b"\r\nTransfer-Encoding: chunked\r\n\r\n",
            ),
            CLIENT_ERROR,
        ),
        id="chunk-trailer-framing",
    ),
    # --- Transfer-Encoding variants.
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: xchunked",
                b"Content-Length: 5",
                b"Connection: close",
                body=b"hello",
            ),
            CLIENT_ERROR,
        ),
        id="te-xchunked",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: chunked, identity",
                b"Connection: close",
                body=b"5\r\nhello\r\n0\r\n\r\n",
            ),
            CLIENT_ERROR,
        ),
        id="te-chunked-identity",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: identity",
                b"Connection: close",
                body=b"hello",
            ),
            CLIENT_ERROR,
        ),
        id="te-identity",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: chunked",
                b"Transfer-Encoding: chunked",
                b"Connection: close",
                body=b"5\r\nhello\r\n0\r\n\r\n",
            ),
            CLIENT_ERROR,
        ),
        id="te-chunked-twice",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: chunked, chunked",
                b"Connection: close",
                body=b"5\r\nhello\r\n0\r\n\r\n",
            ),
            CLIENT_ERROR,
        ),
        id="te-chunked-chunked-list",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding : chunked",
                b"Content-Length: 5",
                b"Connection: close",
                body=b"hello",
            ),
            CLIENT_ERROR,
        ),
        id="te-space-before-colon",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Content-Length: 5",
                b"X-Pad: x",
                b" Transfer-Encoding: chunked",
                b"Connection: close",
                body=b"hello",
            ),
            CLIENT_ERROR,
        ),
        id="te-hidden-in-obs-fold",
    ),
    pytest.param(
        # A transfer coding the sidecar cannot undo: forwarding the still-gzipped bytes as the
        # body would hand the model something other than what the caller meant.
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: gzip, chunked",
                b"Connection: close",
                body=b"%x\r\n" % len(GZ_HELLO) + GZ_HELLO + b"\r\n0\r\n\r\n",
            ),
            NOT_IMPLEMENTED,
            handler=True,
        ),
        id="te-gzip-chunked",
    ),
    pytest.param(
        # HTTP/1.0 has no chunked coding: refused as faulty framing (RFC 9112 section 6.1).
        Case(
            req(
                b"POST /x HTTP/1.0",
                b"Host: x",
                b"Transfer-Encoding: chunked",
                body=b"5\r\nhello\r\n0\r\n\r\n",
            ),
            CLIENT_ERROR,
        ),
        id="te-in-http10",
    ),
    # --- CR, LF and NUL in header values; obs-fold; space before colon.
    pytest.param(
        Case(
            req(b"GET /x HTTP/1.1", b"Host: x", b"X-A: a\rX-B: " + MARKER, b"Connection: close"),
            CLIENT_ERROR,
        ),
        id="header-value-bare-cr",
    ),
    pytest.param(
        Case(
            req(b"GET /x HTTP/1.1", b"Host: x", b"X-A: a\nX-B: " + MARKER, b"Connection: close"),
            CLIENT_ERROR,
        ),
        id="header-value-bare-lf",
    ),
    pytest.param(
        Case(
            req(b"GET /x HTTP/1.1", b"Host: x", b"X-A: a\x00" + MARKER, b"Connection: close"),
            CLIENT_ERROR,
        ),
        id="header-value-nul",
    ),
    pytest.param(
        Case(
            req(b"GET /x HTTP/1.1", b"Host: x", b"X-A\x00: " + MARKER, b"Connection: close"),
            CLIENT_ERROR,
        ),
        id="header-name-nul",
    ),
    pytest.param(
        Case(
            req(b"GET /x HTTP/1.1", b"Host: x", b"X-A: a", b" " + MARKER, b"Connection: close"),
            CLIENT_ERROR,
        ),
        id="obs-fold-space",
    ),
    pytest.param(
        Case(
            req(b"GET /x HTTP/1.1", b"Host: x", b"X-A: a", b"\t" + MARKER, b"Connection: close"),
            CLIENT_ERROR,
        ),
        id="obs-fold-tab",
    ),
    pytest.param(
        Case(
            req(b"GET /x HTTP/1.1", b"Host: x", b"X-A : " + MARKER, b"Connection: close"),
            CLIENT_ERROR,
        ),
        id="header-space-before-colon",
    ),
    pytest.param(
        Case(
            req(b"GET /x HTTP/1.1", b"Host: x", b"X-" + MARKER, b"Connection: close"),
            CLIENT_ERROR,
        ),
        id="header-line-without-colon",
    ),
    pytest.param(
        Case(
            req(b"GET /x HTTP/1.1", b"Host: x", b"Host: DECOY", b"Connection: close"),
            CLIENT_ERROR,
        ),
        id="host-duplicate",
    ),
    pytest.param(
        Case(req(b"GET /x HTTP/1.1\nHost: x\nConnection: close\n"), CLIENT_ERROR),
        id="bare-lf-line-ends",
    ),
    # --- Request lines and versions.
    pytest.param(Case(b"GET /" + MARKER + b"\r\n\r\n", BAD_VERSION, handler=True), id="http-0.9"),
    pytest.param(
        Case(
            req(b"GET /" + MARKER + b" HTTP/2.0", b"Host: x", b"Connection: close"),
            BAD_VERSION,
            handler=True,
        ),
        id="http-2.0-request-line",
    ),
    pytest.param(
        Case(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (*CLIENT_ERROR, *BAD_VERSION)),
        id="h2-prior-knowledge-preface",
    ),
    pytest.param(
        Case(req(b"GET /" + MARKER + b" HTTP/1.2", b"Host: x", b"Connection: close"), BAD_VERSION),
        id="http-1.2",
    ),
    pytest.param(
        Case(req(b"GET /" + MARKER + b" HTTP/1.x", b"Host: x", b"Connection: close"), BAD_VERSION),
        id="http-1.x",
    ),
    pytest.param(
        Case(req(b"GET /" + MARKER + b" HTTP/11", b"Host: x", b"Connection: close"), BAD_VERSION),
        id="http-11-no-dot",
    ),
    pytest.param(
        Case(req(b"GET /" + MARKER + b" FOO/1.1", b"Host: x", b"Connection: close"), BAD_VERSION),
        id="not-http",
    ),
    pytest.param(
        Case(req(b"GET /x HTTP/1.1 " + MARKER, b"Host: x", b"Connection: close"), CLIENT_ERROR),
        id="request-line-extra-token",
    ),
    pytest.param(Case(MARKER + b"\r\n\r\n", CLIENT_ERROR), id="garbage-request-line"),
    # --- Request targets that could steer the sidecar at another host.
    pytest.param(
        Case(
            req(b"GET http://DECOY/" + MARKER + b" HTTP/1.1", b"Host: DECOY", b"Connection: close"),
            CLIENT_ERROR,
            handler=True,
        ),
        id="absolute-form",
    ),
    pytest.param(
        Case(
            req(b"GET https://DECOY/" + MARKER + b" HTTP/1.1", b"Host: x", b"Connection: close"),
            CLIENT_ERROR,
            handler=True,
        ),
        id="absolute-form-https",
    ),
    pytest.param(
        Case(
            req(b"GET //DECOY/" + MARKER + b" HTTP/1.1", b"Host: x", b"Connection: close"),
            CLIENT_ERROR,
            handler=True,
        ),
        id="double-slash-host",
    ),
    pytest.param(
        Case(
            req(
                b"GET http://user@DECOY/" + MARKER + b" HTTP/1.1",
                b"Host: x",
                b"Connection: close",
            ),
            CLIENT_ERROR,
            handler=True,
        ),
        id="userinfo",
    ),
    pytest.param(
        Case(
            req(b"GET @DECOY/" + MARKER + b" HTTP/1.1", b"Host: x", b"Connection: close"),
            CLIENT_ERROR,
        ),
        id="at-authority",
    ),
    pytest.param(
        Case(req(b"GET * HTTP/1.1", b"Host: x", b"Connection: close"), CLIENT_ERROR),
        id="asterisk-get",
    ),
    pytest.param(
        Case(
            req(
                b"POST * HTTP/1.1",
                b"Host: x",
                b"Content-Length: 8",
                b"Connection: close",
                body=MARKER,
            ),
            CLIENT_ERROR,
        ),
        id="asterisk-post",
    ),
    pytest.param(
        Case(
            req(b"OPTIONS * HTTP/1.1", b"Host: x", b"Connection: close"),
            CLIENT_ERROR,
            handler=True,
        ),
        id="asterisk-options",
    ),
    pytest.param(
        Case(
            req(b"CONNECT DECOY HTTP/1.1", b"Host: DECOY", b"Connection: close"),
            NOT_IMPLEMENTED,
            handler=True,
        ),
        id="connect",
    ),
    pytest.param(
        Case(
            req(b"GET /ws HTTP/1.1", b"Host: x", b"Connection: Upgrade", b"Upgrade: websocket"),
            NOT_IMPLEMENTED,
            head_only=True,
            handler=True,
        ),
        id="upgrade-websocket",
    ),
    pytest.param(
        Case(
            req(
                b"GET /x HTTP/1.1",
                b"Host: x",
                b"Connection: Upgrade, HTTP2-Settings",
                b"Upgrade: h2c",
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
            ),
            NOT_IMPLEMENTED,
            head_only=True,
            handler=True,
        ),
        id="upgrade-h2c",
    ),
    # --- Header hygiene: accepted, forwarded without the forbidden headers.
    pytest.param(
        Case(
            req(
                b"GET /x HTTP/1.1",
                b"Host: DECOY",
                b"X-Sidecar-Route: " + MARKER,
                b"x-sidecar-outcome: " + MARKER,
                b"X-SIDECAR-FAILURE-MODE: " + MARKER,
                b"Connection: close",
            ),
            OK,
            forwarded=without(b"x-sidecar-route", b"x-sidecar-outcome", b"x-sidecar-failure-mode"),
        ),
        id="spoofed-x-sidecar-headers",
    ),
    pytest.param(
        Case(
            req(
                b"GET /x HTTP/1.1",
                b"Host: x",
                b"Connection: close, X-Secret, Keep-Alive",
                b"Connection: X-Other",
                b"X-Secret: " + MARKER,
                b"X-Other: " + MARKER,
                b"Keep-Alive: timeout=" + MARKER,
                b"Proxy-Authorization: Basic " + MARKER,
                b"TE: trailers",
                b"Trailer: " + MARKER,
            ),
            OK,
            forwarded=without(b"x-secret", b"x-other", b"keep-alive", b"proxy-authorization"),
        ),
        id="headers-named-in-connection",
    ),
    pytest.param(
        # Naming Content-Length in Connection must not unframe the body the upstream gets.
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Connection: close, Content-Length",
                b"Content-Length: 5",
                body=b"hello",
            ),
            OK,
            forwarded=body_is(b"hello"),
        ),
        id="connection-names-content-length",
    ),
    pytest.param(
        # The upstream gets the configured authority, never the caller's Host.
        Case(
            req(b"GET /x HTTP/1.1", b"Host: DECOY", b"Connection: close"),
            OK,
            forwarded=body_is(b""),
        ),
        id="host-names-decoy",
    ),
    pytest.param(
        # The caller's encoding is passed on as sent: header and body still agree upstream.
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Content-Encoding: gzip",
                b"Transfer-Encoding: chunked",
                b"Connection: close",
                body=b"%x\r\n" % len(GZ_HELLO) + GZ_HELLO + b"\r\n0\r\n\r\n",
            ),
            OK,
            forwarded=body_is(GZ_HELLO),
        ),
        id="content-encoding-passed-through",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Content-Encoding: gzip",
                b"Content-Length: %d" % len(GZ_LARGE),
                b"Connection: close",
                body=GZ_LARGE,
            ),
            OK,
            forwarded=body_is(GZ_LARGE),
        ),
        id="content-encoding-large-passed-through",
    ),
    # --- A second request smuggled in a body.
    pytest.param(
        # Under Content-Length the request text is body: the upstream gets it as body only.
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Content-Length: %d" % len(SMUGGLED_HEAD),
                b"Connection: close",
                body=SMUGGLED_HEAD,
            ),
            OK,
            forwarded=lambda fwd: None,
        ),
        id="request-text-as-cl-body",
    ),
    pytest.param(
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: chunked",
                b"Connection: close",
                body=b"%x\r\n" % len(SMUGGLED_HEAD) + SMUGGLED_HEAD + b"\r\n0\r\n\r\n",
            ),
            OK,
            forwarded=lambda fwd: None,
        ),
        id="request-text-as-chunked-body",
    ),
    pytest.param(
        # Bytes after a `Connection: close` request are refused, never read as a request.
        Case(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Content-Length: 5",
                b"Connection: close",
                body=b"hello" + SMUGGLED_HEAD,
            ),
            CLIENT_ERROR,
        ),
        id="request-after-connection-close",
    ),
    pytest.param(
        # A zero-length chunked body followed by a request head, on a GET.
        Case(
            req(
                b"GET /x HTTP/1.1",
                b"Host: x",
                b"Content-Length: 0",
                b"Transfer-Encoding: chunked",
                b"Connection: close",
                body=b"0\r\n\r\n" + SMUGGLED_HEAD,
            ),
            CLIENT_ERROR,
        ),
        id="cl-zero-te-get",
    ),
]


@pytest.mark.parametrize("case", CASES)
async def test_bad_input(fresh: Edge, case: Case) -> None:
    edge = fresh
    raw = case.raw.replace(b"DECOY", edge.decoy_authority)
    answer = await send(edge, raw, head_only=case.head_only)
    status = status_of(answer)
    assert status in case.statuses, answer[:400]
    if case.handler:
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert b"\r\nx-sidecar-outcome: " in head, answer[:400]
    if status >= 400:
        assert edge.upstream.connections == 0, edge.upstream.all_bytes[:400]
        assert MARKER not in edge.upstream.all_bytes
    else:
        assert case.forwarded is not None, f"accepted a request that must be refused: {raw!r}"
        assert edge.upstream.connections == 1
        fwd = parse_forwarded(edge, edge.upstream.received[0])
        case.forwarded(fwd)
    assert edge.decoy.connections == 0


async def test_pipelined_requests_reach_upstream_as_separate_requests(fresh: Edge) -> None:
    """A complete request followed by another on a kept-alive connection is two requests, each
    forwarded on its own with its own framing; neither ends up inside the other."""
    edge = fresh
    first = req(b"POST /first HTTP/1.1", b"Host: x", b"Content-Length: 5", body=b"hello")
    second = req(b"GET /second HTTP/1.1", b"Host: x", b"Connection: close")
    answer = await send(edge, first + second)
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer[:600]
    assert edge.upstream.connections == 2
    forwarded = [parse_forwarded(edge, conn) for conn in edge.upstream.received]
    assert [(f.method, f.target, f.body) for f in forwarded] == [
        (b"POST", b"/first", b"hello"),
        (b"GET", b"/second", b""),
    ]
    assert edge.decoy.connections == 0


async def test_bad_chunk_after_streaming_started_never_completes_upstream(fresh: Edge) -> None:
    """A chunk-size error arriving after the body started streaming upstream (it is past the
    replay buffer) aborts the upstream request at once: the model never gets a complete
    request, and the caller gets a 400 rather than a 504 once the upstream attempt times out."""
    edge = fresh
    reader, writer = await asyncio.open_connection(edge.host, edge.port)
    try:
        first = b"x" * (2 * REPLAY_LIMIT)
        writer.write(
            req(
                b"POST /x HTTP/1.1",
                b"Host: x",
                b"Transfer-Encoding: chunked",
                b"Connection: close",
                body=b"%x\r\n" % len(first) + first + b"\r\n",
            )
        )
        await writer.drain()
        # Bounded wait until the body is streaming upstream.
        for _ in range(int(WAIT / 0.01)):
            if b"\r\n\r\n" in edge.upstream.all_bytes:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the body never started streaming upstream")
        writer.write(b"zz\r\n" + SMUGGLED_HEAD + b"\r\n0\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(WAIT):
            answer = await reader.read()
    finally:
        writer.close()
    # Answered by the handler at once, not after the upstream attempt timed out (a 504).
    assert status_of(answer) == 400, answer[:400]
    assert b"x-sidecar-failure-mode: client_error" in answer
    received = edge.upstream.all_bytes
    assert MARKER not in received
    assert not received.endswith(b"0\r\n\r\n")
    assert edge.decoy.connections == 0
