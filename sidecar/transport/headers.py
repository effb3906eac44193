"""Header hygiene in both directions.

Hop-by-hop headers and every header named in `Connection` never cross the proxy; callers cannot
inject `x-sidecar-*` headers; `x-forwarded-*` are added on the way in.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "HOP_BY_HOP",
    "clean_request_headers",
    "clean_response_headers",
    "connection_tokens",
    "is_upgrade",
]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

# Set by the transport for the upstream's authority and framing; never copied from the caller.
_REQUEST_DROP = frozenset({"host", "content-length"})


def connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def _dropped(name: str, named: set[str]) -> bool:
    lname = name.lower()
    return lname in HOP_BY_HOP or lname in named or lname.startswith("proxy-")


def is_upgrade(headers: Iterable[tuple[str, str]]) -> bool:
    """WebSocket and h2c upgrades (and HTTP/2 prior-knowledge settings) are not proxied."""
    items = list(headers)
    for name, _value in items:
        if name.lower() in ("upgrade", "http2-settings"):
            return True
    return "upgrade" in connection_tokens(items)


def clean_request_headers(
    headers: Iterable[tuple[str, str]],
    *,
    client_ip: str | None,
    proto: str,
    host: str | None,
) -> list[tuple[str, str]]:
    items = list(headers)
    named = connection_tokens(items)
    out: list[tuple[str, str]] = []
    prior_xff: list[str] = []
    for name, value in items:
        lname = name.lower()
        if _dropped(name, named) or lname in _REQUEST_DROP or lname.startswith("x-sidecar-"):
            continue
        if lname == "x-forwarded-for":
            prior_xff.append(value)
            continue
        if lname in ("x-forwarded-proto", "x-forwarded-host"):
            continue
        out.append((name, value))
    xff = ", ".join([*prior_xff, client_ip] if client_ip else prior_xff)
    if xff:
        out.append(("X-Forwarded-For", xff))
    out.append(("X-Forwarded-Proto", proto))
    if host:
        out.append(("X-Forwarded-Host", host))
    return out


def clean_response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    items = list(headers)
    named = connection_tokens(items)
    return [
        (name, value)
        for name, value in items
        if not _dropped(name, named)
        and name.lower() != "content-length"
        and not name.lower().startswith("x-sidecar-")
    ]
