"""The benchmark's floor: the least an aiohttp reverse proxy can do, to measure what any
aiohttp-based Python proxy costs on this machine before it does anything of its own.

    python -m scripts.bench_floor --upstream http://127.0.0.1:8000 --port 0

One route for every method and path: read the request body, send it upstream with its end-to-end
headers over a pooled keep-alive connection (no connection limit), copy the status,
`Content-Type` and `Content-Length` back, and stream the body chunk by chunk as it arrives. No
header hygiene, no timeouts, no retries, no telemetry, no access log. An upstream that cannot be
reached answers 502. Like `sidecar run`, it prints one JSON `listening` line once bound (which
`scripts.bench_procs.start` waits for), runs on uvloop when installed (`SIDECAR_EVENT_LOOP` or
`--loop` choose), and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from sidecar import eventloop

__all__ = ["main", "serve"]

UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)
#: Hop-by-hop and framing headers; the rest (the demo model's `x-demo-fault`, say) is forwarded.
_NOT_FORWARDED = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te"}
)
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


async def _forward(request: web.Request) -> web.StreamResponse:
    app = request.app
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
    try:
        upstream = await app[SESSION].request(
            request.method, app[UPSTREAM] + request.path_qs, data=body, headers=headers
        )
    except (aiohttp.ClientError, OSError):
        return web.Response(status=502, text="upstream unreachable\n")
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        if content_type := upstream.headers.get("Content-Type"):
            response.headers["Content-Type"] = content_type
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _session(app: web.Application) -> AsyncIterator[None]:
    # Whatever the upstream sent goes back as sent: no decompression, no pool limit.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
    ) as session:
        app[SESSION] = session
        yield


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", _forward)
    return app


async def serve(upstream: str, host: str, port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(make_app(upstream), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0]
        print(
            json.dumps(
                {
                    "event": "listening",
                    "proxy": f"{bound[0]}:{bound[1]}",
                    "upstream": upstream,
                    "pid": os.getpid(),
                    "event_loop": eventloop.loop_name(),
                }
            ),
            flush=True,
        )
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument(
        "--loop",
        default=os.environ.get("SIDECAR_EVENT_LOOP", "auto"),
        help="event loop: auto (uvloop when installed), uvloop or asyncio "
        "(default: SIDECAR_EVENT_LOOP, else auto)",
    )
    args = parser.parse_args(argv)
    try:
        choice = eventloop.parse_choice(args.loop)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return eventloop.run(serve(args.upstream, args.host, args.port), choice)
    except ImportError:
        print("bench_floor: --loop uvloop but uvloop is not installed", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
