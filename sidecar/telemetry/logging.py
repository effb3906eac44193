"""structlog configuration: JSON lines by default, a console renderer on a TTY.

Logging configuration is the one process-global; it is set once, in the entry point.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger"]


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
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )
    # Library loggers (aiohttp's own) go to stderr at warning level.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
