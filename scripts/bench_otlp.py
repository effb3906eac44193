"""A loopback OTLP/HTTP trace receiver for the benchmark: accepts `POST /v1/traces`, counts the
spans it got and answers an empty success, so the sidecar exports for real without a collector.

`python -m scripts.bench_otlp [--port 0]` logs one JSON `listening` line; `GET /stats` returns
`{"requests", "spans", "bytes"}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from aiohttp import web

__all__ = ["main"]

_STATS = web.AppKey("stats", dict)


def _count_spans(body: bytes) -> int:
    try:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
    except ImportError:  # counting is a nicety; receiving is what matters
        return 0
    message = ExportTraceServiceRequest()
    message.ParseFromString(body)
    return sum(
        len(scope.spans) for resource in message.resource_spans for scope in resource.scope_spans
    )


async def _traces(request: web.Request) -> web.Response:
    body = await request.read()
    stats = request.app[_STATS]
    stats["requests"] += 1
    stats["bytes"] += len(body)
    try:
        stats["spans"] += _count_spans(body)
    except Exception:
        stats["undecodable"] += 1
    return web.Response(body=b"", content_type="application/x-protobuf")


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[_STATS])


async def _serve(port: int) -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_STATS] = {"requests": 0, "spans": 0, "bytes": 0, "undecodable": 0}
    app.router.add_post("/v1/traces", _traces)
    app.router.add_get("/stats", _stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host, bound = runner.addresses[0][:2]
    print(json.dumps({"event": "listening", "address": f"{host}:{bound}"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_otlp", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
