"""Raw TCP servers for tests: a recording upstream that keeps every byte it receives and answers
with a canned response, and a decoy that must never see a connection."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

__all__ = ["RecordingUpstream"]

DEFAULT_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\nok"
)


@dataclass
class RecordingUpstream:
    """Accepts connections, records the bytes received, answers `response` once it has seen a
    complete request head (and `Content-Length` bytes of body when declared)."""

    response: bytes = DEFAULT_RESPONSE
    connections: int = 0
    received: list[bytes] = field(default_factory=list)
    port: int = 0
    _server: asyncio.base_events.Server | None = None
    _got_request: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def all_bytes(self) -> bytes:
        return b"".join(self.received)

    async def start(self) -> RecordingUpstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        index = len(self.received)
        self.received.append(b"")
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = await asyncio.wait_for(reader.read(65536), 10)
                if not chunk:
                    return
                buf += chunk
                self.received[index] = buf
            head, _, body = buf.partition(b"\r\n\r\n")
            length = 0
            chunked = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or 0)
                if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            while (not chunked and len(body) < length) or (
                chunked and not body.endswith(b"0\r\n\r\n")
            ):
                chunk = await asyncio.wait_for(reader.read(65536), 10)
                if not chunk:
                    return
                body += chunk
                buf += chunk
                self.received[index] = buf
            self._got_request.set()
            writer.write(self.response)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
