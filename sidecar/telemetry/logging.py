"""structlog configuration: JSON lines by default, a console renderer on a TTY.

Logging configuration is the one process-global; it is set once, in the entry point.

Every proxied request writes an access line, so the JSON path is kept cheap: orjson renders the
line (about 2.5x faster than the standard library), loggers are cached after first use, and the
UTC timestamp reuses the formatted second (same ISO 8601 form as structlog's `TimeStamper`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

__all__ = ["configure_logging", "get_logger", "utc_timestamp"]

_second: list[Any] = [None, ""]  # the last whole second seen and its formatted prefix


def utc_timestamp(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """`timestamp` as `2026-11-27T11:42:05.123456Z`, formatting each second only once."""
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second[0] = whole
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    event_dict["timestamp"] = f"{_second[1]}.{int((now - whole) * 1_000_000):06d}Z"
    return event_dict


def configure_logging(fmt: str | None = None, level: str | None = None) -> None:
    """`fmt` is `json`, `console` or None (console on a TTY, else JSON; `SIDECAR_LOG_FORMAT`
    overrides)."""
    fmt = (
        fmt
        or os.environ.get("SIDECAR_LOG_FORMAT")
        or ("console" if sys.stdout.isatty() else "json")
    )
    level_name = (level or os.environ.get("SIDECAR_LOG_LEVEL") or "info").upper()
    numeric = logging.getLevelNamesMapping().get(level_name, logging.INFO)
    renderer: Any
    factory: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer()
        factory = structlog.WriteLoggerFactory(file=sys.stdout)
    else:
        renderer = structlog.processors.JSONRenderer(
            serializer=orjson.dumps, option=orjson.OPT_NON_STR_KEYS
        )
        factory = structlog.BytesLoggerFactory(file=sys.stdout.buffer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            utc_timestamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Library loggers (aiohttp's own) go to stderr at warning level.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
