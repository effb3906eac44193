"""Human units in policy files: durations (`250ms`, `30s`, `5m`) and sizes (`64KiB`, `1MiB`).

Parsed once into plain floats (seconds) and ints (bytes), so nothing downstream parses again.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = ["ByteSize", "Duration", "format_duration", "parse_duration", "parse_size"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}


def parse_duration(value: Any) -> float:
    """`250ms` → 0.25; a bare number is seconds. Negative or unparsable values are errors."""
    if isinstance(value, bool):
        raise ValueError("a duration must be like 250ms, 2s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a duration; use e.g. 250ms, 2s, 5m or 1h")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError("a duration must be like 250ms, 2s, 5m or 1h")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: Any) -> int:
    """`1MiB` → 1048576; a bare number is bytes."""
    if isinstance(value, bool):
        raise ValueError("a size must be like 512KiB or 1MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a size; use e.g. 4096, 64KiB or 1MiB")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise ValueError("a size must be like 512KiB or 1MiB")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h)?$"},
                {"type": "number", "minimum": 0},
            ],
            "description": "A duration: 250ms, 2s, 5m, 1h, or a number of seconds.",
        }
    ),
]

ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\d+(B|KB|KiB|MB|MiB|GB|GiB)?$"},
                {"type": "integer", "minimum": 0},
            ],
            "description": "A size in bytes: 4096, 64KiB, 1MiB.",
        }
    ),
]
