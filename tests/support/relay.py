"""A fault-injecting TCP relay for tests: sits between the sidecar and the model and can add
latency, limit bandwidth, slice writes into 1-byte pieces, reset before or after the response
headers, black-hole a connection, or close slowly."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

__all__ = ["Relay", "RelayFaults"]


@dataclass
class RelayFaults:
    latency: float = 0.0  # before forwarding each chunk, both directions
    bandwidth: int | None = None  # bytes per second, upstream → client
    slice_writes: bool = False  # 1-byte writes, upstream → client
    reset_before_headers: bool = False  # RST as soon as the request arrives
    reset_after_headers: bool = False  # RST right after the response head was relayed
    black_hole: bool = False  # accept, read, never answer
    slow_close: float = 0.0  # wait this long before closing after the upstream closed


@dataclass
class Relay:
    target_host: str
    target_port: int
    faults: RelayFaults = field(default_factory=RelayFaults)
    port: int = 0
    connections: int = 0
    _server: asyncio.base_events.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        f = self.faults
        try:
            first = await creader.read(65536)
            if f.black_hole:
                while await creader.read(65536):
                    pass
                return
            if f.reset_before_headers:
                self._reset(cwriter)
                return
            ureader, uwriter = await asyncio.open_connection(self.target_host, self.target_port)
            uwriter.write(first)
            await uwriter.drain()
            up = asyncio.create_task(self._pump(creader, uwriter, downstream=False))
            try:
                await self._pump(ureader, cwriter, downstream=True)
            finally:
                up.cancel()
                with contextlib.suppress(BaseException):
                    await up
                uwriter.close()
            if f.slow_close:
                await asyncio.sleep(f.slow_close)
            cwriter.close()
        except (ConnectionError, asyncio.IncompleteReadError):
            cwriter.transport.abort()
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, downstream: bool
    ) -> None:
        f = self.faults
        head_done = False
        seen = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            if f.latency:
                await asyncio.sleep(f.latency)
            if downstream and f.reset_after_headers and not head_done:
                seen += chunk
                if b"\r\n\r\n" in seen:
                    head = seen.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
                    writer.write(head)
                    await writer.drain()
                    self._reset(writer)
                    raise ConnectionResetError("relay reset after headers")
                continue
            if downstream and (f.slice_writes or f.bandwidth):
                step = 1 if f.slice_writes else max(1, f.bandwidth // 20)  # type: ignore[operator]
                for i in range(0, len(chunk), step):
                    writer.write(chunk[i : i + step])
                    await writer.drain()
                    if f.bandwidth:
                        await asyncio.sleep(step / f.bandwidth)
            else:
                writer.write(chunk)
                await writer.drain()
