"""Parsing a model's JSON answer: orjson when it accepts the bytes, the standard library otherwise.

orjson is several times faster and accepts a strict subset of what `json.loads` does (it refuses
NaN/Infinity, numbers that overflow a double or a 64-bit integer, and lone surrogates), so a
document orjson parses means the same either way; anything it refuses is judged again by the
standard library, whose verdict (and error message) stands.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

__all__ = ["parse_json"]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _finite_float(text: str) -> float:
    # `1e999` overflows to inf without ever spelling NaN or Infinity.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def parse_json(data: bytes | str, *, finite_only: bool = False) -> Any:
    """The document; ValueError (or UnicodeDecodeError, RecursionError) when it is not JSON.
    `finite_only` also refuses NaN, Infinity and numbers too large for a double."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    if finite_only:
        return json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    return json.loads(data)
