"""Redaction of what a failure record keeps: header values by name, JSON paths, regexes, and
(by default) email addresses and card numbers, then a size cap.

Stdlib and jsonpath-ng only (the policy schema validates its fields with `compile_json_path`
and `compile_pattern` from here). Redaction runs on the recorder's writer thread, never on the
event loop. The order is fixed so that nothing sensitive survives a cut: bodies are parsed (JSON
values are redacted as values, so an email written with JSON escapes or a card number written
as a JSON number is still found), redacted, serialised, and only then cut to size. A body too
large to parse is cut to a raw cap first, and the partial token at the cut is dropped, so a card
number split by the cut cannot survive half-redacted.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ALWAYS_REDACTED_HEADERS",
    "CARD",
    "EMAIL",
    "REDACTED",
    "RawExcerpt",
    "RedactionRules",
    "Redactor",
    "compile_json_path",
    "compile_pattern",
    "luhn_valid",
]

REDACTED = "[REDACTED]"
EMAIL = "[EMAIL]"
CARD = "[CARD]"

#: Credentials are never stored, whatever the policy says.
ALWAYS_REDACTED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "x-auth-token",
    }
)

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
# 13-19 digits, optionally grouped by single spaces or dashes; Luhn decides.
_CARD = re.compile(r"(?<![0-9])[0-9](?:[ \-]?[0-9]){12,18}(?![0-9])")
# What may be part of a token cut in two at a raw cap (emails, card numbers, words).
_PARTIAL_TAIL = re.compile(r"[A-Za-z0-9._%+@\- ]+\Z")
_TAIL_WINDOW = 320
_MAX_HEADERS = 64
_MAX_HEADER_VALUE = 256
#: Bodies up to this size are parsed as JSON so that JSON paths and values can be redacted.
PARSE_LIMIT = 256 * 1024


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = ord(char) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def compile_json_path(path: str) -> Any:
    """Parse a JSONPath expression (jsonpath-ng's extended syntax); `ValueError` if bad."""
    from jsonpath_ng.ext.parser import parse

    try:
        return parse(path)
    except Exception as exc:  # jsonpath-ng raises several types for bad input
        raise ValueError(f"not a valid JSONPath expression: {exc}") from None


def compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None


@dataclass(frozen=True)
class RedactionRules:
    """Plain config, built from the policy's `failures:` section."""

    headers: frozenset[str] = frozenset()
    json_paths: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    emails: bool = True
    card_numbers: bool = True
    #: Largest excerpt kept, in characters of its JSON text.
    max_excerpt: int = 4096


@dataclass(frozen=True)
class RawExcerpt:
    """What the request path hands over, unredacted: references, no copies of large bodies."""

    method: str = ""
    path: str = ""
    status: int | None = None
    headers: Sequence[tuple[str, str]] = ()
    #: The body, already cut to the raw cap; None when it was not kept (streamed).
    body: bytes | None = None
    #: The body's full size when known.
    body_size: int | None = None
    #: Why there is no body (e.g. streamed, not buffered).
    body_note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Redactor:
    """Compiled rules. Thread-safe (no state after construction)."""

    def __init__(self, rules: RedactionRules) -> None:
        self.rules = rules
        self.headers = frozenset(h.lower() for h in rules.headers) | ALWAYS_REDACTED_HEADERS
        self.json_paths = [compile_json_path(p) for p in rules.json_paths]
        self.patterns = [compile_pattern(p) for p in rules.patterns]

    # -- text and values -------------------------------------------------------------------------
    def text(self, value: str) -> str:
        """Regexes, emails and card numbers replaced in a string."""
        for pattern in self.patterns:
            value = pattern.sub(REDACTED, value)
        if self.rules.emails:
            value = _EMAIL.sub(EMAIL, value)
        if self.rules.card_numbers:
            value = _CARD.sub(_card_or_keep, value)
        return value

    def value(self, data: Any) -> Any:
        """A JSON value with its JSON paths replaced and every string (and key) redacted."""
        for path in self.json_paths:
            try:
                matches = path.find(data)
            except Exception:
                continue
            for match in matches:
                try:
                    data = match.full_path.update(data, REDACTED)
                except Exception:
                    continue
        return self._walk(data)

    def _walk(self, data: Any) -> Any:
        if isinstance(data, str):
            return self.text(data)
        if isinstance(data, bool) or data is None or isinstance(data, float):
            return data
        if isinstance(data, int):
            digits = str(abs(data))
            if self.rules.card_numbers and 13 <= len(digits) <= 19 and luhn_valid(digits):
                return CARD
            return data
        if isinstance(data, dict):
            return {self.text(str(k)): self._walk(v) for k, v in data.items()}
        if isinstance(data, list | tuple):
            return [self._walk(v) for v in data]
        return self.text(str(data))

    def headers_of(self, headers: Iterable[tuple[str, str]]) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in headers:
            if len(out) >= _MAX_HEADERS:
                break
            lname = name.lower()
            if lname in self.headers:
                out[lname] = REDACTED
            else:
                out[lname] = self.text(value[:_MAX_HEADER_VALUE])
        return out

    # -- bodies and excerpts ---------------------------------------------------------------------
    def body(self, data: bytes, content_type: str, complete: bool) -> tuple[Any, str | None]:
        """The redacted body (a JSON value or text) and a note when something was left out."""
        lower = content_type.lower()
        if complete and len(data) <= PARSE_LIMIT:
            try:
                parsed = json.loads(data)
            except ValueError:
                pass
            else:
                return self.value(parsed), None
        elif self.json_paths and ("json" in lower or data[:1] in (b"{", b"[")):
            # JSON paths cannot be applied to a body we could not parse: keep none of it.
            return None, "omitted: too large to redact by JSON path"
        text = data.decode("utf-8", "replace")
        if not complete:
            text = _drop_partial_tail(text)
        if "x-www-form-urlencoded" in lower:
            text = urllib.parse.unquote_plus(text)
        return self.text(text), None

    def excerpt(self, raw: RawExcerpt) -> str:
        """The JSON text stored for a request or a response, at most `max_excerpt` long."""
        limit = self.rules.max_excerpt
        head: dict[str, Any] = {}
        if raw.method:
            head["method"] = raw.method
        if raw.path:
            head["path"] = self.text(raw.path)
        if raw.status is not None:
            head["status"] = raw.status
        headers = self.headers_of(raw.headers)
        head["headers"] = headers
        for key, value in raw.extra.items():
            head[key] = self._walk(value)
        body: Any = None
        note = raw.body_note
        if raw.body is not None:
            size = raw.body_size if raw.body_size is not None else len(raw.body)
            complete = size <= len(raw.body)
            body, omitted = self.body(raw.body, headers.get("content-type", ""), complete)
            note = omitted or note
            head["body_bytes"] = size
            if not complete and omitted is None:
                head["body_truncated"] = True
        if note:
            head["body_note"] = note
        return _fit(head, body, limit)


def _drop_partial_tail(text: str) -> str:
    """Cut off the token a raw cap may have split (looked for in the last few hundred chars:
    longer than any email address or card number)."""
    tail = text[-_TAIL_WINDOW:]
    match = _PARTIAL_TAIL.search(tail)
    if match is None:
        return text
    return text[: len(text) - (len(tail) - match.start())]


def _card_or_keep(match: re.Match[str]) -> str:
    digits = re.sub(r"[ \-]", "", match.group(0))
    return CARD if luhn_valid(digits) else match.group(0)


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)


def _fit(head: dict[str, Any], body: Any, limit: int) -> str:
    """`head` plus `body`, the body cut (as text) so that the whole is at most `limit` chars."""
    whole = _dumps({**head, "body": body})
    if len(whole) <= limit:
        return whole
    text = body if isinstance(body, str) else _dumps(body)
    head = {**head, "body_truncated": True}
    base = len(_dumps({**head, "body": ""}))
    room = limit - base
    while room > 0:
        candidate = _dumps({**head, "body": text[:room]})
        if len(candidate) <= limit:
            return candidate
        room -= max(1, len(candidate) - limit)
    # Not even the headers fit: keep only what is certain to.
    small = _dumps({"body_truncated": True, "note": "excerpt over max_excerpt"})
    return small if len(small) <= limit else ""
