"""Edge limits against the real `sidecar run`: each answers with a clear status, and a request
refused before its body is read forwards nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import aiohttp
import pytest

from tests.conftest import SidecarFactory, simple_policy
from tests.support.upstreams import RecordingUpstream


def limited(upstream: str, **limits: Any) -> dict[str, Any]:
    p = simple_policy(upstream)
    p["limits"] = limits
    return p


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def read_response(reader: asyncio.StreamReader, wait: float = 10.0) -> bytes:
    return await asyncio.wait_for(reader.read(), wait)


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


async def test_too_many_or_too_large_headers_get_431(
    start_sidecar: SidecarFactory,
    recording_upstream: RecordingUpstream,
    http: aiohttp.ClientSession,
) -> None:
    sc = start_sidecar(limited(recording_upstream.url, max_headers=20, max_header_bytes="2KiB"))
    many = {f"x-h{i}": "v" for i in range(30)}
    async with http.get(sc.url + "/x", headers=many) as resp:
        assert resp.status == 431
        body = await resp.json()
        assert body["error"]["failure_mode"] == "client_error"
    async with http.get(sc.url + "/x", headers={"x-big": "a" * 3000}) as resp:
        assert resp.status == 431
    assert recording_upstream.connections == 0


async def test_declared_body_over_limit_is_413_before_forwarding(
    start_sidecar: SidecarFactory,
    recording_upstream: RecordingUpstream,
) -> None:
    sc = start_sidecar(limited(recording_upstream.url, max_body="1KiB"))
    reader, writer = await open_raw(sc.url)
    # Only the head is sent: the answer must come without the body being read.
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    raw = await read_response(reader)
    writer.close()
    assert status_of(raw) == 413
    assert b'"failure_mode":"client_error"' in raw
    assert recording_upstream.connections == 0


async def test_chunked_body_over_limit_never_reaches_model_complete(
    start_sidecar: SidecarFactory,
    recording_upstream: RecordingUpstream,
) -> None:
    # The replay buffer is small, so the body streams upstream before the limit is crossed.
    p = limited(recording_upstream.url, max_body="64KiB")
    p["routes"][0]["retry"] = {"replay_limit": "4KiB"}
    sc = start_sidecar(p)
    reader, writer = await open_raw(sc.url)
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    chunk = os.urandom(8192)
    for _ in range(12):  # 96 KiB in all, over the 64 KiB limit
        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    raw = await read_response(reader)
    writer.close()
    assert status_of(raw) == 413
    # The upstream saw the start of the body but never its end: no terminating chunk.
    received = recording_upstream.all_bytes
    assert not received.endswith(b"0\r\n\r\n")
    assert len(received) < 96 * 1024


async def test_slow_header_gets_408_and_close(
    start_sidecar: SidecarFactory, recording_upstream: RecordingUpstream
) -> None:
    sc = start_sidecar(limited(recording_upstream.url, header_timeout="500ms"))
    reader, writer = await open_raw(sc.url)
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
    await writer.drain()
    raw = await read_response(reader, wait=10)
    writer.close()
    assert status_of(raw) == 408
    # A connection that sends nothing at all is closed too.
    reader, writer = await open_raw(sc.url)
    raw = await read_response(reader, wait=10)
    writer.close()
    assert status_of(raw) == 408
    assert recording_upstream.connections == 0


async def test_stalled_body_gets_408(
    start_sidecar: SidecarFactory, recording_upstream: RecordingUpstream
) -> None:
    sc = start_sidecar(limited(recording_upstream.url, body_idle="500ms"))
    reader, writer = await open_raw(sc.url)
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nConnection: close\r\n\r\nabc"
    )
    await writer.drain()
    raw = await read_response(reader, wait=10)
    writer.close()
    assert status_of(raw) == 408
    assert recording_upstream.connections == 0


async def test_connection_cap_refuses_with_503(
    start_sidecar: SidecarFactory,
    recording_upstream: RecordingUpstream,
    http: aiohttp.ClientSession,
) -> None:
    sc = start_sidecar(limited(recording_upstream.url, max_connections=3, header_timeout="30s"))
    held = [await open_raw(sc.url) for _ in range(3)]
    try:
        reader, writer = await open_raw(sc.url)
        raw = await read_response(reader)
        writer.close()
        assert status_of(raw) == 503
        assert b"Retry-After: 1" in raw
        assert b"overloaded" in raw
    finally:
        for _, w in held:
            w.close()
    # Once the held connections are gone, new ones are served again (bounded wait).
    for _ in range(100):
        with contextlib.suppress(aiohttp.ClientError):  # refused while the cap still holds
            async with http.get(sc.url + "/x") as resp:
                if resp.status == 200:
                    break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("connections were not released")
