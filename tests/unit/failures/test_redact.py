"""Redaction of failure records: no email, card number, configured header, JSON path or pattern
survives into the SQLite file (asserted on its raw bytes), Luhn decides what is a card number, a
cut never leaves half a secret, and excerpts respect their size cap."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from sidecar.clock import FakeClock
from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.failures.capture import (
    CAPTURE_ERROR,
    CAPTURE_REQUEST,
    CAPTURE_RESPONSE,
    CaptureConfig,
    FailureRecorder,
)
from sidecar.failures.redact import (
    CARD,
    EMAIL,
    REDACTED,
    RawExcerpt,
    RedactionRules,
    Redactor,
    luhn_valid,
)
from sidecar.failures.sqlite import DB_NAME, SqliteFailureStore
from sidecar.outcome import Outcome
from sidecar.pipeline import BytesBody, ProxyRequest, ProxyResponse, RequestBody

# Secrets that must never reach the disk, in the forms a caller might send them.
EMAIL_ADDR = "jane.doe+test@example.co.uk"
EMAIL_ESCAPED = "bob\\u0040corp.example"  # JSON escape: the parsed value is bob@corp.example
CARD_SPACED = "4111 1111 1111 1111"
CARD_DASHED = "5500-0000-0000-0004"
CARD_NUMBER = 4012888888881881  # a Visa test number written as a JSON number
CARD_PLAIN = "378282246310005"  # Amex test number, 15 digits
HEADER_SECRET = "hunter2-session-token"
BEARER = "Bearer sk-live-abcdef123456"
SSN = "078-05-1120"
TICKET = "TICKET-99817"

RULES = RedactionRules(
    headers=frozenset({"x-user-session"}),
    json_paths=("$.patient.ssn", "$..api_secret"),
    patterns=(r"TICKET-\d+",),
    max_excerpt=4096,
)


def request_body() -> bytes:
    text = (
        "{"
        f'"contact": "{EMAIL_ADDR}", "other": "{EMAIL_ESCAPED}", '
        f'"cards": ["{CARD_SPACED}", "{CARD_DASHED}", {CARD_NUMBER}], '
        f'"note": "pay with {CARD_PLAIN} please, ref {TICKET}", '
        f'"patient": {{"ssn": "{SSN}", "name": "J"}}, '
        '"deep": {"x": [{"api_secret": "s3cr3t-value"}]}, '
        '"order": "order 1234567890123 is not a card"'
        "}"
    )
    return text.encode()


def failed_ctx(clock: FakeClock) -> RequestContext:
    ctx = RequestContext(
        request_id="req-1",
        route="chat",
        upstream="model",
        clock=clock,
        started=clock.monotonic(),
        method="POST",
        path=f"/v1/users/{EMAIL_ADDR}/chat",
        trace_id="ab" * 16,
    )
    ctx.failure_mode = FailureMode.UPSTREAM_5XX
    ctx.attempts = 2
    ctx.upstream_status = 503
    ctx.extra[CAPTURE_REQUEST] = ProxyRequest(
        method="POST",
        path_qs="/v1/chat",
        headers=[
            ("Authorization", BEARER),
            ("X-User-Session", HEADER_SECRET),
            ("Cookie", "sid=" + HEADER_SECRET),
            ("Content-Type", "application/json"),
        ],
        body=RequestBody(request_body()),
    )
    ctx.extra[CAPTURE_RESPONSE] = ProxyResponse(
        status=503,
        headers=[("Content-Type", "application/json"), ("Set-Cookie", "s=" + HEADER_SECRET)],
        body=BytesBody(json.dumps({"error": f"cannot reach {EMAIL_ADDR}"}).encode()),
    )
    return ctx


def stored_bytes(state: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(state.glob(DB_NAME + "*")))


async def test_no_secret_survives_in_the_sqlite_file(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SqliteFailureStore(tmp_path / DB_NAME)
    recorder = FailureRecorder(store, clock=clock, config=lambda: CaptureConfig(rules=RULES))
    await recorder.start()
    recorder.request_finished(failed_ctx(clock), 502, Outcome.ERROR)
    err_ctx = failed_ctx(clock)
    err_ctx.request_id = "req-2"
    err_ctx.extra.pop(CAPTURE_RESPONSE)
    err_ctx.failure_mode = FailureMode.INVALID_OUTPUT
    err_ctx.extra[CAPTURE_ERROR] = SidecarError(
        FailureMode.INVALID_OUTPUT, f"answer mentions {EMAIL_ADDR} and {CARD_SPACED}"
    )
    recorder.request_finished(err_ctx, 502, Outcome.ERROR)
    await recorder.stop(5.0)
    assert recorder.written == {"request": 2} and recorder.dropped == {}

    raw = stored_bytes(tmp_path)
    assert raw, "nothing was written"
    for secret in (
        EMAIL_ADDR,
        "bob@corp.example",
        "corp.example",
        CARD_SPACED,
        CARD_DASHED,
        str(CARD_NUMBER),
        CARD_PLAIN,
        "4111111111111111",
        HEADER_SECRET,
        "sk-live-abcdef123456",
        SSN,
        "s3cr3t-value",
        TICKET,
    ):
        assert secret.encode() not in raw, f"{secret!r} reached the failure store"
        assert secret.encode("utf-16-le") not in raw

    # The records are there, with markers where the secrets were and the rest intact.
    with sqlite3.connect(f"file:{tmp_path / DB_NAME}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT request_id, path, cause, request_excerpt, response_excerpt FROM failures"
            " ORDER BY request_id"
        ).fetchall()
    assert [r[0] for r in rows] == ["req-1", "req-2"]
    request = json.loads(rows[0][3])
    assert request["headers"]["authorization"] == REDACTED
    assert request["headers"]["x-user-session"] == REDACTED
    assert request["headers"]["cookie"] == REDACTED
    assert request["headers"]["content-type"] == "application/json"
    body = request["body"]
    assert body["contact"] == EMAIL and body["other"] == EMAIL
    assert body["cards"] == [CARD, CARD, CARD]
    assert body["patient"] == {"ssn": REDACTED, "name": "J"}
    assert body["deep"] == {"x": [{"api_secret": REDACTED}]}
    assert body["note"] == f"pay with {CARD} please, ref {REDACTED}"
    # A 13-digit run that fails the Luhn check is not a card number.
    assert body["order"] == "order 1234567890123 is not a card"
    assert rows[0][1] == f"/v1/users/{EMAIL}/chat"
    response = json.loads(rows[0][4])
    assert response["status"] == 503 and response["headers"]["set-cookie"] == REDACTED
    assert response["body"] == {"error": f"cannot reach {EMAIL}"}
    assert rows[1][2] == f"answer mentions {EMAIL} and {CARD}"
    assert json.loads(rows[1][4])["body"]["error"]["failure_mode"] == "invalid_output"


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("1234567890123")


def test_text_patterns_and_defaults_can_be_turned_off() -> None:
    keep = Redactor(RedactionRules(emails=False, card_numbers=False))
    assert keep.text(f"{EMAIL_ADDR} {CARD_SPACED}") == f"{EMAIL_ADDR} {CARD_SPACED}"
    default = Redactor(RedactionRules())
    assert default.text(f"a {EMAIL_ADDR}, b {CARD_SPACED}.") == f"a {EMAIL}, b {CARD}."
    # Credentials are redacted whatever the policy lists.
    assert default.headers_of([("Authorization", "x"), ("X-Api-Key", "y")]) == {
        "authorization": REDACTED,
        "x-api-key": REDACTED,
    }


def test_a_card_number_cut_by_the_raw_cap_does_not_survive_in_part() -> None:
    redactor = Redactor(RedactionRules())
    text = b"please charge 4111 1111 11"  # the rest of the number was beyond the raw cap
    body, note = redactor.body(text, "text/plain", complete=False)
    assert body == "please charge" or "4111" not in str(body)
    assert note is None


def test_large_json_is_omitted_when_json_paths_cannot_be_applied() -> None:
    redactor = Redactor(RedactionRules(json_paths=("$.ssn",)))
    excerpt = redactor.excerpt(
        RawExcerpt(
            method="POST",
            path="/x",
            headers=[("content-type", "application/json")],
            body=b'{"ssn": "078-05-1120", "pad": "' + b"x" * 100,
            body_size=10_000_000,
        )
    )
    data = json.loads(excerpt)
    assert data["body"] is None and "JSON path" in data["body_note"]
    assert SSN not in excerpt


@pytest.mark.parametrize("limit", [256, 1000, 4096])
def test_excerpts_respect_the_size_cap(limit: int) -> None:
    redactor = Redactor(RedactionRules(max_excerpt=limit))
    big = json.dumps({"text": "é" * 20_000, "mail": EMAIL_ADDR}).encode()
    excerpt = redactor.excerpt(
        RawExcerpt(
            method="POST", path="/x", headers=[("content-type", "application/json")], body=big
        )
    )
    assert len(excerpt) <= limit
    data = json.loads(excerpt)
    assert data["body_truncated"] is True
    assert EMAIL_ADDR not in excerpt
