"""The proxy against the real demo model and raw recording upstreams: streaming, byte-exact
bodies, header hygiene both ways, SSRF, redirects, cookies."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import aiohttp
from yarl import URL

from tests.conftest import SidecarFactory, simple_policy
from tests.support.upstreams import RecordingUpstream


async def raw_request(url: str, data: bytes, wait: float = 10.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    try:
        # The requests ask for `Connection: close` (or are refused), so read to the end.
        return await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()


async def test_request_headers_hygiene(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(simple_policy(model_url))
    async with http.get(
        URL(sc.url + "/echo/path%2Fx?q=1&x=%2F", encoded=True),
        headers={
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "must-not-cross",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "X-Sidecar-Outcome": "spoofed",
            "X-Sidecar-Review-Id": "spoofed",
            "X-Request-Id": "caller-id-1",
            "Authorization": "Bearer app",
            "X-Custom": "kept",
        },
    ) as resp:
        assert resp.status == 200
        echoed = await resp.json()
        assert resp.headers["x-request-id"] == "caller-id-1"
        assert resp.headers["x-sidecar-outcome"] == "ok"
    seen = {name.lower(): value for name, value in echoed["headers"]}
    for gone in (
        "x-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "x-sidecar-outcome",
        "x-sidecar-review-id",
    ):
        assert gone not in seen, gone
    assert seen["x-custom"] == "kept"
    assert seen["authorization"] == "Bearer app"
    assert seen["x-request-id"] == "caller-id-1"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == sc.url.removeprefix("http://")
    assert seen["host"] == model_url.removeprefix("http://")
    assert "user-agent" in seen  # aiohttp's default UA was sent by the test client itself
    assert echoed["path"] == "/echo/path%2Fx?q=1&x=%2F"


async def test_no_headers_added_that_caller_did_not_send(
    model_url: str, start_sidecar: SidecarFactory
) -> None:
    sc = start_sidecar(simple_policy(model_url))
    raw = await raw_request(
        sc.url, b"GET /echo/raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    seen = {name.lower() for name, _ in body["headers"]}
    assert not seen & {"user-agent", "accept", "accept-encoding", "content-type", "cookie"}


async def test_request_id_generated_and_outcome_header(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(simple_policy(model_url))
    async with http.post(
        sc.url + "/v1/chat/completions", json={"model": "demo", "messages": []}
    ) as resp:
        assert resp.status == 200
        assert len(resp.headers["x-request-id"]) >= 16
        assert resp.headers["x-sidecar-outcome"] == "ok"
        assert "x-sidecar-failure-mode" not in resp.headers
        assert (await resp.json())["choices"]


async def test_bodies_are_byte_exact(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(simple_policy(model_url))
    payload = os.urandom(3 * 1024 * 1024 + 17)  # larger than the replay buffer: streamed
    async with http.post(sc.url + "/echo/upload", data=payload) as resp:
        echoed = await resp.json()
    assert echoed["body_len"] == len(payload)
    assert echoed["body_sha256"] == hashlib.sha256(payload).hexdigest()
    small = b"\x00\x01binary\r\n\r\n" * 100
    async with http.post(sc.url + "/echo/small", data=small) as resp:
        echoed = await resp.json()
    assert echoed["body_sha256"] == hashlib.sha256(small).hexdigest()
    for path in ("/gzip", "/bytes/1000000"):
        async with http.get(model_url + path) as direct:
            expected = await direct.read()
            expected_headers = direct.headers
        async with http.get(sc.url + path) as proxied:
            got = await proxied.read()
            assert proxied.headers.get("Content-Encoding") == expected_headers.get(
                "Content-Encoding"
            )
        assert got == expected, path
    async with http.get(sc.url + "/gzip") as proxied:
        assert proxied.headers["Content-Encoding"] == "gzip"


async def test_sse_streams_through_before_model_finishes(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(simple_policy(model_url))
    async with http.post(
        sc.url + "/v1/chat/completions",
        json={"model": "demo", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-demo-fault": "hold_after_first"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        assert first.startswith(b"data: ")
        # The model is still holding the stream: nothing more has arrived yet.
        assert not resp.content.is_eof()
        async with http.post(model_url + "/_demo/release") as rel:
            assert rel.status == 200
        rest = await asyncio.wait_for(resp.content.read(), 10)
    assert rest.rstrip().endswith(b"data: [DONE]")


async def test_upstream_redirect_is_returned_not_followed(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(simple_policy(model_url))
    await http.post(model_url + "/_demo/stats/reset")
    async with http.get(sc.url + "/redirect", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"].endswith("/elsewhere")
        assert resp.headers["x-sidecar-outcome"] == "ok"
    async with http.get(model_url + "/_demo/stats") as stats:
        assert (await stats.json())["requests"] == 1


async def test_upstream_cookies_not_replayed_to_another_caller(
    model_url: str, start_sidecar: SidecarFactory
) -> None:
    sc = start_sidecar(simple_policy(model_url))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as a:
        async with a.get(sc.url + "/set-cookie") as resp:
            assert "session=secret" in resp.headers["Set-Cookie"]  # the caller gets it
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as b:
        async with b.get(sc.url + "/echo/who") as resp:
            seen = {n.lower() for n, _ in (await resp.json())["headers"]}
    assert "cookie" not in seen


async def test_response_hop_by_hop_and_spoofed_headers_dropped(
    start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    up = await RecordingUpstream(
        response=(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
            b"Connection: close, X-Internal\r\nX-Internal: secret\r\nKeep-Alive: timeout=1\r\n"
            b"Proxy-Authenticate: Basic\r\nTrailer: X-T\r\nX-Sidecar-Outcome: spoofed\r\n"
            b"X-Model: kept\r\n\r\nhello"
        )
    ).start()
    try:
        sc = start_sidecar(simple_policy(up.url))
        async with http.get(sc.url + "/anything") as resp:
            assert await resp.read() == b"hello"
            headers = {k.lower(): v for k, v in resp.headers.items()}
    finally:
        await up.stop()
    for gone in ("x-internal", "keep-alive", "proxy-authenticate", "trailer"):
        assert gone not in headers, gone
    assert headers["x-sidecar-outcome"] == "ok"
    assert headers["x-model"] == "kept"


async def test_ssrf_targets_never_reach_another_host(
    start_sidecar: SidecarFactory,
    recording_upstream: RecordingUpstream,
    decoy: RecordingUpstream,
) -> None:
    sc = start_sidecar(simple_policy(recording_upstream.url))
    decoy_authority = f"127.0.0.1:{decoy.port}"
    cases = [
        f"GET http://{decoy_authority}/x HTTP/1.1\r\nHost: {decoy_authority}\r\n\r\n",
        f"GET //{decoy_authority}/x HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET @{decoy_authority}/x HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET http://user@{decoy_authority}/x HTTP/1.1\r\nHost: x\r\n\r\n",
        f"CONNECT {decoy_authority} HTTP/1.1\r\nHost: {decoy_authority}\r\n\r\n",
    ]
    for case in cases:
        raw = await raw_request(
            sc.url, case.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n").encode()
        )
        status = int(raw.split(b" ", 2)[1])
        assert 400 <= status < 600, (case, raw[:200])
    # A Host header naming the decoy still goes to the configured upstream.
    raw = await raw_request(
        sc.url, f"GET /y HTTP/1.1\r\nHost: {decoy_authority}\r\nConnection: close\r\n\r\n".encode()
    )
    assert raw.startswith(b"HTTP/1.1 200")
    assert decoy.connections == 0
    assert recording_upstream.connections == 1
    head = recording_upstream.all_bytes.split(b"\r\n\r\n")[0]
    assert head.startswith(b"GET /y HTTP/1.1")
    assert f"Host: 127.0.0.1:{recording_upstream.port}".encode() in head


async def test_upgrade_requests_get_501(
    start_sidecar: SidecarFactory,
    recording_upstream: RecordingUpstream,
    http: aiohttp.ClientSession,
) -> None:
    sc = start_sidecar(simple_policy(recording_upstream.url))
    for headers in (
        {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": "x",
            "Sec-WebSocket-Version": "13",
        },
        {
            "Connection": "Upgrade, HTTP2-Settings",
            "Upgrade": "h2c",
            "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA",
        },
    ):
        async with http.get(sc.url + "/ws", headers=headers) as resp:
            assert resp.status == 501
            body = await resp.json()
            assert body["error"]["failure_mode"] == "client_error"
            assert resp.headers["x-sidecar-failure-mode"] == "client_error"
    assert recording_upstream.connections == 0


async def test_no_route_is_404_envelope(
    model_url: str, start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sc = start_sidecar(simple_policy(model_url, match={"path_prefix": "/v1", "methods": ["POST"]}))
    async with http.get(sc.url + "/v1/models") as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["error"]["type"] == "sidecar_error"
    assert body["error"]["request_id"] == resp.headers["x-request-id"]
    async with http.get(sc.url + "/v1x") as resp:
        assert resp.status == 404


async def test_sse_cut_mid_event_never_forwards_half_an_event(
    start_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    # The model sends one whole event and half of the next, then the connection drops.
    body = b'data: {"n": 1}\n\ndata: {"n": 2, "partial'
    up = await RecordingUpstream(
        response=(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body + b"\r\n"
        )
    ).start()
    try:
        sc = start_sidecar(simple_policy(up.url, retry={"max_attempts": 1}))
        async with http.post(sc.url + "/v1/chat/completions", json={"stream": True}) as resp:
            assert resp.status == 200
            text = (await resp.read()).decode()
    finally:
        await up.stop()
    assert text.startswith('data: {"n": 1}\n\n')
    assert "partial" not in text
    assert "event: error\ndata: " in text
    assert '"failure_mode":"stream_interrupted"' in text
    assert "[DONE]" not in text


async def test_dot_segments_are_refused(
    start_sidecar: SidecarFactory, recording_upstream: RecordingUpstream
) -> None:
    sc = start_sidecar(simple_policy(recording_upstream.url, match={"path_prefix": "/v1"}))
    for target in ("/v1/../admin", "/v1/./x", "/v1/%2e%2e/admin", "/v1/%2E%2E"):
        raw = await raw_request(
            sc.url, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert raw.startswith(b"HTTP/1.1 400"), (target, raw[:100])
    assert recording_upstream.connections == 0
