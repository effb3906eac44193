"""ValidateStrategy and validate_bytes: a 200 that is not a usable answer is `invalid_output`."""

from __future__ import annotations

import itertools
import json
from typing import Any

import jsonschema
import pytest

from sidecar.clock import FakeClock
from sidecar.errors import FailureMode, SidecarError
from sidecar.pipeline import BytesBody
from sidecar.strategies.validate import ValidateConfig, ValidateStrategy, validate_bytes
from tests.unit.strategies.scripted import Scripted, StreamingBody, make_ctx, make_request, response

KSERVE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["outputs"],
    "properties": {
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "data"],
                "properties": {
                    "name": {"type": "string"},
                    "data": {"type": "array", "items": {"type": "number"}},
                },
            },
        }
    },
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def streamed(data: bytes) -> StreamingBody:
    chunk = 7 if len(data) < 1000 else 65536
    return StreamingBody([data[i : i + chunk] for i in range(0, len(data), chunk)])


async def check(
    clock: FakeClock,
    data: bytes,
    *,
    config: ValidateConfig | None = None,
    content_type: str | None = "application/json",
    method: str = "POST",
    status: int = 200,
) -> tuple[Any, Any, StreamingBody]:
    """Run one answer through the strategy; return (response or error, ctx, original body)."""
    body = streamed(data)
    ctx = make_ctx(clock, method=method)
    strategy = ValidateStrategy(config or ValidateConfig())
    upstream = Scripted(response(status, body, content_type=content_type))
    try:
        outcome: Any = await strategy(make_request(method=method), ctx, upstream)
    except SidecarError as exc:
        outcome = exc
    return outcome, ctx, body


def assert_invalid(outcome: Any, ctx: Any, *fragments: str) -> None:
    assert isinstance(outcome, SidecarError), outcome
    assert outcome.mode == FailureMode.INVALID_OUTPUT
    events = [e for e in ctx.events if e.name == "validation_failed"]
    assert len(events) == 1
    assert events[0].attrs["reason"] == outcome.message
    for fragment in fragments:
        assert fragment in outcome.message


# -- valid answers -----------------------------------------------------------------------------


async def test_valid_answer_is_buffered_into_a_bytes_body(clock: FakeClock) -> None:
    data = json.dumps({"outputs": [{"name": "p", "data": [0.1, 0.9]}]}).encode()
    outcome, ctx, _ = await check(clock, data, config=ValidateConfig(schema=KSERVE_SCHEMA))
    assert outcome.status == 200
    assert isinstance(outcome.body, BytesBody)
    assert outcome.body.data == data
    assert outcome.content_length == len(data)
    assert await outcome.body.read_chunk() == data
    assert ctx.events == []


@pytest.mark.parametrize("content_type", ["application/json", "application/vnd.api+json"])
async def test_any_json_content_type_is_parsed(clock: FakeClock, content_type: str) -> None:
    outcome, ctx, _ = await check(clock, b"{not json", content_type=content_type)
    assert_invalid(outcome, ctx, "not valid JSON")


# -- empty -------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"   \n\t "])
async def test_empty_answer_to_an_inference_call_is_invalid(clock: FakeClock, data: bytes) -> None:
    outcome, ctx, _ = await check(clock, data)
    assert_invalid(outcome, ctx, "empty body")


async def test_empty_answer_to_a_get_is_fine(clock: FakeClock) -> None:
    outcome, _, _ = await check(clock, b"", method="GET")
    assert outcome.status == 200
    assert outcome.content_length == 0


async def test_empty_answer_allowed_when_configured(clock: FakeClock) -> None:
    outcome, _, _ = await check(clock, b"", config=ValidateConfig(reject_empty=False))
    assert outcome.status == 200


async def test_declared_empty_non_json_answer_is_invalid(clock: FakeClock) -> None:
    body = StreamingBody([])
    answer = response(200, body, content_type="text/plain")
    answer.content_length = 0
    ctx = make_ctx(clock)
    with pytest.raises(SidecarError) as info:
        await ValidateStrategy(ValidateConfig())(make_request(), ctx, Scripted(answer))
    assert_invalid(info.value, ctx, "empty body")
    assert body.closed


# -- not JSON, non-finite numbers --------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"{not json", b'{"a": 1', b"<html>oops</html>", b'{"a": 1} trailing', b"\xff\xfe\x00garbage"],
)
async def test_malformed_json_is_invalid(clock: FakeClock, data: bytes) -> None:
    outcome, ctx, _ = await check(clock, data)
    assert_invalid(outcome, ctx, "not valid JSON")


@pytest.mark.parametrize(
    "data",
    [
        b'{"score": NaN}',
        b'{"score": Infinity}',
        b'{"outputs": [{"data": [1.0, -Infinity]}]}',
        b'{"score": 1e999}',  # overflows to inf without ever spelling "Infinity"
        b"[-1e400]",
    ],
)
async def test_non_finite_numbers_are_invalid(clock: FakeClock, data: bytes) -> None:
    outcome, ctx, _ = await check(clock, data)
    assert_invalid(outcome, ctx)


async def test_non_finite_numbers_allowed_when_configured(clock: FakeClock) -> None:
    outcome, _, _ = await check(
        clock, b'{"score": NaN, "x": 1e999}', config=ValidateConfig(reject_non_finite=False)
    )
    assert outcome.status == 200


async def test_large_finite_numbers_are_fine(clock: FakeClock) -> None:
    outcome, _, _ = await check(clock, b'{"big": 1.7e308, "int": 123456789012345678901234567890}')
    assert outcome.status == 200


async def test_deeply_nested_json_is_invalid_output_not_a_crash(clock: FakeClock) -> None:
    data = b"[" * 200_000 + b"]" * 200_000
    outcome, ctx, _ = await check(clock, data, config=ValidateConfig(max_body=1_000_000))
    assert_invalid(outcome, ctx)


async def test_deeply_nested_json_under_a_recursive_schema_is_invalid_output(
    clock: FakeClock,
) -> None:
    schema = {"type": "array", "items": {"$ref": "#"}}
    data = b"[" * 900 + b"]" * 900
    outcome, ctx, _ = await check(clock, data, config=ValidateConfig(schema=schema))
    assert_invalid(outcome, ctx)


async def test_non_json_answer_without_schema_is_not_read(clock: FakeClock) -> None:
    outcome, ctx, body = await check(clock, b"plain words", content_type="text/plain")
    assert outcome.body is body
    assert body.chunks_read == 0
    assert ctx.events == []


async def test_json_parsing_can_be_switched_off(clock: FakeClock) -> None:
    outcome, _, _ = await check(clock, b"{not json", config=ValidateConfig(json_body=False))
    assert outcome.status == 200


# -- schema ------------------------------------------------------------------------------------


async def test_schema_violation_names_the_path(clock: FakeClock) -> None:
    data = json.dumps({"outputs": [{"name": "p", "data": [0.1, "high"]}]}).encode()
    outcome, ctx, _ = await check(clock, data, config=ValidateConfig(schema=KSERVE_SCHEMA))
    assert_invalid(outcome, ctx, "violates the schema at outputs/0/data/1", "'high'")


async def test_schema_violation_at_the_root(clock: FakeClock) -> None:
    outcome, ctx, _ = await check(clock, b"[1, 2]", config=ValidateConfig(schema=KSERVE_SCHEMA))
    assert_invalid(outcome, ctx, "(root)")


async def test_missing_required_field(clock: FakeClock) -> None:
    outcome, ctx, _ = await check(clock, b"{}", config=ValidateConfig(schema=KSERVE_SCHEMA))
    assert_invalid(outcome, ctx, "'outputs' is a required property")


async def test_schema_applies_whatever_the_content_type(clock: FakeClock) -> None:
    outcome, ctx, _ = await check(
        clock, b'{"outputs": 3}', config=ValidateConfig(schema=KSERVE_SCHEMA), content_type=None
    )
    assert_invalid(outcome, ctx, "outputs")


def test_an_invalid_schema_is_rejected_at_construction() -> None:
    with pytest.raises(jsonschema.exceptions.SchemaError):
        ValidateStrategy(ValidateConfig(schema={"type": "no-such-type"}))


# -- size --------------------------------------------------------------------------------------


async def test_oversized_answer_is_invalid_without_reading_everything(clock: FakeClock) -> None:
    body = StreamingBody(itertools.repeat(b"x" * 10))  # an endless answer
    ctx = make_ctx(clock)
    strategy = ValidateStrategy(ValidateConfig(max_body=25))
    with pytest.raises(SidecarError) as info:
        await strategy(make_request(), ctx, Scripted(response(200, body)))
    assert_invalid(info.value, ctx, "larger than 25 bytes")
    assert body.read_all_limits == [25]
    assert body.chunks_read <= 4
    assert body.closed


async def test_answer_of_exactly_max_body_is_accepted(clock: FakeClock) -> None:
    data = b'{"k": "' + b"v" * 20 + b'"}'
    outcome, _, _ = await check(clock, data, config=ValidateConfig(max_body=len(data)))
    assert outcome.status == 200
    assert outcome.content_length == len(data)


# -- left untouched ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [201, 204, 404, 429, 500, 503])
async def test_non_200_passes_untouched(clock: FakeClock, status: int) -> None:
    outcome, ctx, body = await check(clock, b"{garbage", status=status)
    assert outcome.status == status
    assert outcome.body is body
    assert body.chunks_read == 0
    assert outcome.content_length is None
    assert ctx.events == []


@pytest.mark.parametrize("content_type", ["text/event-stream", "text/event-stream; charset=utf-8"])
async def test_sse_passes_untouched(clock: FakeClock, content_type: str) -> None:
    outcome, ctx, body = await check(clock, b"data: {garbage\n\n", content_type=content_type)
    assert outcome.body is body
    assert body.chunks_read == 0
    assert ctx.events == []


async def test_head_passes_untouched(clock: FakeClock) -> None:
    outcome, _, body = await check(clock, b"", method="HEAD")
    assert outcome.body is body
    assert body.chunks_read == 0


async def test_body_without_read_all_passes_untouched(clock: FakeClock) -> None:
    answer = response(200, BytesBody(b"{garbage"))
    result = await ValidateStrategy(ValidateConfig())(
        make_request(), make_ctx(clock), Scripted(answer)
    )
    assert result is answer


async def test_read_error_closes_the_body_and_propagates(clock: FakeClock) -> None:
    error = SidecarError(FailureMode.STREAM_INTERRUPTED, "reset")
    body = StreamingBody([b"{}"], read_error=error)
    with pytest.raises(SidecarError) as info:
        await ValidateStrategy(ValidateConfig())(
            make_request(), make_ctx(clock), Scripted(response(200, body))
        )
    assert info.value is error
    assert body.closed


async def test_upstream_errors_pass_through(clock: FakeClock) -> None:
    error = SidecarError(FailureMode.CONNECT_ERROR, "refused")
    with pytest.raises(SidecarError) as info:
        await ValidateStrategy(ValidateConfig())(make_request(), make_ctx(clock), Scripted(error))
    assert info.value is error


# -- validate_bytes ----------------------------------------------------------------------------


def test_validate_bytes_accepts_a_good_document() -> None:
    assert (
        validate_bytes(
            b'{"a": [1, 2.5]}', "application/json", ValidateConfig(), None, inference=True
        )
        is None
    )


def test_validate_bytes_reports_why() -> None:
    problem = validate_bytes(
        b'{"a": NaN}', "application/json", ValidateConfig(), None, inference=True
    )
    assert problem is not None and "NaN" in problem


async def test_gzip_json_answer_is_validated_decoded_and_passed_unchanged() -> None:
    import gzip

    from sidecar.clock import FakeClock
    from sidecar.pipeline import BytesBody as _BB
    from sidecar.strategies.validate import ValidateConfig as _VC
    from sidecar.strategies.validate import ValidateStrategy as _VS
    from tests.unit.strategies.scripted import (
        Scripted,
        StreamingBody,
        make_ctx,
        make_request,
        response,
    )

    good = gzip.compress(b'{"ok": 1}', mtime=0)
    bad = gzip.compress(b"not json", mtime=0)
    headers = [("Content-Type", "application/json"), ("Content-Encoding", "gzip")]
    strategy = _VS(_VC())
    for body, fails in ((good, False), (bad, True), (b"\x1f\x8bcorrupt", True)):
        ctx = make_ctx(FakeClock())
        scripted = Scripted(
            response(200, body=StreamingBody([body]), headers=headers, content_type=None)
        )
        if fails:
            with pytest.raises(SidecarError) as info:
                await strategy(make_request(method="POST"), ctx, scripted)
            assert info.value.mode == FailureMode.INVALID_OUTPUT
        else:
            result = await strategy(make_request(method="POST"), ctx, scripted)
            assert isinstance(result.body, _BB)
            assert result.body.data == good  # the caller gets the original gzip bytes
    # An encoding the sidecar cannot read passes unjudged rather than being called invalid.
    br = [("Content-Type", "application/json"), ("Content-Encoding", "br")]
    ctx = make_ctx(FakeClock())
    result = await strategy(
        make_request(method="POST"),
        ctx,
        Scripted(response(200, body=StreamingBody([b"\x00"]), headers=br, content_type=None)),
    )
    assert result.status == 200
