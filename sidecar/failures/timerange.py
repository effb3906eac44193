"""Time ranges for the failure commands: `--since 7d`, `--until 2025-06-01T12:00Z`.

A relative value (`90s`, `30m`, `36h`, `7d`, `2w`) means that long before now; anything else is
read as an ISO-8601 date or time, in UTC when it names no zone.
"""

from __future__ import annotations

import datetime
import re

__all__ = ["format_time", "parse_when"]

_RELATIVE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_when(value: str, now: float) -> float:
    """Epoch seconds for `value`; `ValueError` with a usable message when it is neither form."""
    match = _RELATIVE.match(value)
    if match is not None:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        moment = datetime.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"{value!r} is neither a time ago (30m, 36h, 7d, 2w) nor an ISO-8601 date or time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def format_time(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
