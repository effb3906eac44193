from __future__ import annotations

from sidecar.transport.headers import clean_request_headers, clean_response_headers, is_upgrade


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [n.lower() for n, _ in headers]


def test_request_drops_hop_by_hop_and_connection_named() -> None:
    out = clean_request_headers(
        [
            ("Connection", "keep-alive, X-Secret"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "x"),
            ("Transfer-Encoding", "chunked"),
            ("Proxy-Authorization", "Basic x"),
            ("Proxy-Foo", "1"),
            ("X-Secret", "s"),
            ("X-Sidecar-Outcome", "ok"),
            ("x-sidecar-anything", "1"),
            ("Host", "evil.example"),
            ("Content-Length", "5"),
            ("Authorization", "Bearer t"),
            ("X-Forwarded-For", "10.0.0.1"),
        ],
        client_ip="127.0.0.1",
        proto="http",
        host="evil.example",
    )
    assert names(out) == [
        "authorization",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    ]
    assert dict(out)["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    assert dict(out)["X-Forwarded-Host"] == "evil.example"


def test_response_drops_hop_by_hop() -> None:
    out = clean_response_headers(
        [
            ("Connection", "close, X-Internal"),
            ("X-Internal", "1"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "10"),
            ("Set-Cookie", "a=b"),
            ("x-sidecar-outcome", "spoofed"),
            ("Content-Type", "application/json"),
        ]
    )
    assert out == [("Set-Cookie", "a=b"), ("Content-Type", "application/json")]


def test_upgrade_detection() -> None:
    assert is_upgrade([("Upgrade", "websocket"), ("Connection", "Upgrade")])
    assert is_upgrade([("Connection", "Upgrade, HTTP2-Settings"), ("HTTP2-Settings", "x")])
    assert not is_upgrade([("Connection", "keep-alive")])
