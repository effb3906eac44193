"""Page positions of the review list, shared by every backend: `<created_at>_<id>` of the last
item shown, so any value of that shape is a valid place to resume (items are listed in
`(created_at, id)` order)."""

from __future__ import annotations

import re

__all__ = ["CURSOR_PATTERN", "decode_cursor", "encode_cursor"]

#: The shape of `next_cursor`: the last item's creation time and id.
CURSOR_PATTERN = r"^([0-9]{1,12}(?:\.[0-9]{1,9})?)_([0-9a-f]{32})$"
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(created_at: float, review_id: str) -> str:
    return f"{created_at!r}_{review_id}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    match = _CURSOR.fullmatch(cursor)
    if match is None:
        raise ValueError("cursor is not one this server gave out")
    return float(match.group(1)), match.group(2)
