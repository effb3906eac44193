"""Output validation: a 200 that is not a usable answer becomes `invalid_output`.

Sits inside the breaker and outside the attempt timeout, so invalid output trips the breaker and
is retried on idempotent routes. Checks: empty body (for inference calls), not JSON where JSON is
declared, NaN/Infinity anywhere, a JSON Schema violation. At most `max_body` bytes are read; a
larger answer is classified, never buffered without bound. Streams (SSE) are not buffered here.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sidecar.context import RequestContext
from sidecar.errors import FailureMode, SidecarError
from sidecar.pipeline import BytesBody, Handler, ProxyRequest, ProxyResponse
from sidecar.strategies.jsonparse import parse_json

if TYPE_CHECKING:  # jsonschema loads only for a route with a schema (idle memory)
    import jsonschema

__all__ = ["ValidateConfig", "ValidateStrategy", "validate_bytes"]


@dataclass(frozen=True)
class ValidateConfig:
    json_body: bool = True
    schema: dict[str, Any] | None = None
    reject_empty: bool = True
    reject_non_finite: bool = True
    max_body: int = 4 * 1024 * 1024


def validate_bytes(
    data: bytes,
    content_type: str,
    config: ValidateConfig,
    validator: jsonschema.protocols.Validator | None,
    *,
    inference: bool,
) -> str | None:
    """Return why the body is invalid, or None when it is fine."""
    if not data.strip():
        return (
            "the model answered 200 with an empty body"
            if config.reject_empty and inference
            else None
        )
    is_json = "json" in content_type.lower()
    if not is_json and validator is None:
        return None
    if not (config.json_body or validator is not None):
        return None
    try:
        doc = parse_json(data, finite_only=config.reject_non_finite)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"the model's answer is not valid JSON: {exc}"
    except RecursionError:
        return "the model's answer is nested too deeply to parse"
    if validator is not None:
        import jsonschema

        try:
            error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
        except RecursionError:
            return "the model's answer is nested too deeply to check against the schema"
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            return f"the model's answer violates the schema at {where}: {error.message[:200]}"
    return None


def _decoded(data: bytes, encoding: str, limit: int) -> bytes | None:
    """The answer without its content coding (the caller still gets the original bytes);
    None when the coding is unknown or decodes to more than `limit` bytes."""
    if encoding in ("identity", ""):
        return data
    if encoding in ("gzip", "x-gzip", "deflate"):
        wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS
        out = zlib.decompressobj(wbits).decompress(data, limit + 1)  # zlib.error: corrupt
        return None if len(out) > limit else out
    return None


class ValidateStrategy:
    def __init__(self, config: ValidateConfig) -> None:
        self.config = config
        self.validator: jsonschema.protocols.Validator | None = None
        if config.schema is not None:
            import jsonschema

            cls = jsonschema.validators.validator_for(config.schema)
            cls.check_schema(config.schema)
            self.validator = cls(config.schema)

    async def __call__(
        self, request: ProxyRequest, ctx: RequestContext, next: Handler
    ) -> ProxyResponse:
        response = await next(request, ctx)
        if response.status != 200 or request.method == "HEAD":
            return response
        content_type = response.header("Content-Type") or ""
        if "text/event-stream" in content_type.lower():
            return response
        inference = request.method == "POST"
        is_json = "json" in content_type.lower()
        if not is_json and self.validator is None:
            # Not a JSON answer: nothing to parse, so nothing is buffered; only an empty answer
            # to an inference call is caught, from its declared length.
            if self.config.reject_empty and inference and response.content_length == 0:
                response.body.close()
                self._fail(ctx, "the model answered 200 with an empty body")
            return response
        read_all = getattr(response.body, "read_all", None)
        if read_all is None:
            return response
        try:
            data = await read_all(self.config.max_body)
        except BaseException:
            response.body.close()
            raise
        if data is None:
            response.body.close()
            self._fail(ctx, f"the model's answer is larger than {self.config.max_body} bytes")
        assert data is not None
        encoding = (response.header("Content-Encoding") or "identity").strip().lower()
        try:
            plain = _decoded(data, encoding, self.config.max_body)
        except zlib.error as exc:
            self._fail(ctx, f"the model's {encoding} answer is corrupt: {exc}")
            raise  # unreachable: _fail raises
        if plain is None:
            # An encoding we cannot read (br, zstd, ...) or a bomb over the cap: the bytes pass
            # through unjudged rather than being called invalid.
            ctx.emit("validation_skipped", reason=f"content-encoding {encoding}")
            response.body = BytesBody(data)
            response.content_length = len(data)
            return response
        problem = validate_bytes(
            plain, content_type, self.config, self.validator, inference=inference
        )
        if problem is not None:
            self._fail(ctx, problem)
        response.body = BytesBody(data)
        response.content_length = len(data)
        return response

    def _fail(self, ctx: RequestContext, reason: str) -> None:
        ctx.emit("validation_failed", reason=reason)
        raise SidecarError(FailureMode.INVALID_OUTPUT, reason)
