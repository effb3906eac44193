"""Which event loop runs a server process: uvloop when installed (about 15% less CPU per proxied
request than the standard loop), or the standard one. `SIDECAR_EVENT_LOOP` chooses: `auto` (the
default), `uvloop` or `asyncio`. Imports nothing heavy, so light processes (the benchmark's floor
proxy) can use it too.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["CHOICES", "loop_name", "parse_choice", "run"]

CHOICES = ("auto", "uvloop", "asyncio")

T = TypeVar("T")


def parse_choice(value: str) -> str:
    """A `SIDECAR_EVENT_LOOP` value, checked; ValueError names the allowed ones."""
    choice = value.strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"SIDECAR_EVENT_LOOP must be auto, uvloop or asyncio, not {value!r}")
    return choice


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """Run `main` to completion on the chosen loop. ImportError when `uvloop` is asked for and
    is not installed (`main` is closed, never started)."""
    if choice == "auto":
        choice = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            main.close()
            raise
        return uvloop.run(main)
    return asyncio.run(main)


def loop_name() -> str:
    """`uvloop` or `asyncio`: the running loop's package, for the `listening` line."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]
