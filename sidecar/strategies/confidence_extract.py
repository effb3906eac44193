"""Confidence extraction: read one probability in [0, 1] out of a model's answer.

A classifier for the confidence gate (`sidecar.strategies.confidence`), kept apart from what the
gate decides, the way `classify.py` is kept apart from retry and breaker. Kinds:

- `kserve_v2`: a named output's class probabilities (`predict_proba`) → the top probability, or
  the probability of a chosen class; with several rows the least confident row decides.
- `openai_logprobs`: chat (`logprobs.content[].logprob`) and completions
  (`logprobs.token_logprobs[]`), whole answers or SSE streams → the mean token probability, the
  minimum, or the first token's, as the policy chooses.
- `json_path`: a JSONPath expression (jsonpath-ng) whose first match is the number.
- `header`: a response header such as `x-model-confidence`.
- `cel`: a CEL expression (cel-python) over `response` (the JSON answer; for a stream, its last
  JSON event) and `headers` (lower-case names).

An answer without a usable number raises `ConfidenceMissing` with the reason, never anything else:
missing confidence is an outcome of its own that the policy decides about.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.strategies.jsonparse import parse_json

__all__ = [
    "Answer",
    "ConfidenceMissing",
    "ExtractConfig",
    "Extractor",
    "SseEvents",
    "build_extractor",
    "compile_cel",
    "compile_json_path",
]

KINDS = ("kserve_v2", "openai_logprobs", "json_path", "header", "cel")
AGGREGATES = ("mean", "min", "first")


class ConfidenceMissing(Exception):
    """No usable confidence in the answer; `reason` says why (for logs and the review item)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ExtractConfig:
    kind: str
    #: kserve_v2: the output's name (the first output when None).
    output: str | None = None
    #: kserve_v2: judge this class's probability instead of the top one.
    class_index: int | None = None
    #: openai_logprobs: "mean" | "min" | "first".
    aggregate: str = "mean"
    #: json_path: the expression.
    path: str | None = None
    #: header: the header's name.
    header: str = "x-model-confidence"
    #: cel: the expression.
    expression: str | None = None


class SseEvents:
    """Parses an SSE byte stream incrementally into its JSON `data:` events (`[DONE]` and
    non-JSON data are skipped). Keeps at most `limit` bytes of events; past that `overflow`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.events: list[Any] = []
        self.overflow = False
        self._size = 0
        self._partial = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        if self.overflow:
            return
        self._size += len(chunk)
        if self._size > self.limit:
            self.overflow = True
            self.events.clear()
            self._data.clear()
            self._partial = b""
            return
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line.rstrip(b"\r"))

    def close(self) -> None:
        if self._partial:
            self._line(self._partial.rstrip(b"\r"))
            self._partial = b""
        self._line(b"")

    def _line(self, line: bytes) -> None:
        if not line:
            if self._data:
                payload = b"\n".join(self._data)
                self._data = []
                if payload.strip() != b"[DONE]":
                    try:
                        self.events.append(parse_json(payload))
                    except (ValueError, UnicodeDecodeError, RecursionError):
                        pass
            return
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)


@dataclass
class Answer:
    """What an extractor sees: headers, and either a whole body or a stream's JSON events.
    `body` is None when the body was over the read cap (`too_large`)."""

    headers: Sequence[tuple[str, str]]
    body: bytes | None = None
    events: list[Any] | None = None
    too_large: bool = False
    #: Why the body cannot be read at all (e.g. an unsupported content coding).
    unreadable: str | None = None
    _doc: Any = field(default=None, repr=False)
    _parsed: bool = field(default=False, repr=False)

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def json(self) -> Any:
        """The answer as JSON: the body, or the last JSON event of a stream."""
        if self._parsed:
            return self._doc
        if self.too_large:
            raise ConfidenceMissing("the answer is larger than the confidence read limit")
        if self.unreadable is not None:
            raise ConfidenceMissing(self.unreadable)
        if self.events is not None:
            if not self.events:
                raise ConfidenceMissing("the stream carried no JSON events")
            self._doc = self.events[-1]
        else:
            if not self.body or not self.body.strip():
                raise ConfidenceMissing("the answer is empty")
            try:
                self._doc = parse_json(self.body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise ConfidenceMissing("the answer is not JSON") from None
        self._parsed = True
        return self._doc


class Extractor(Protocol):
    #: False when the headers alone carry the confidence.
    needs_body: bool

    def extract(self, answer: Answer) -> float: ...


def probability(value: Any, what: str) -> float:
    """A number in [0, 1], or `ConfidenceMissing`."""
    if isinstance(value, bool) or value is None:
        raise ConfidenceMissing(f"{what} is not a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfidenceMissing(f"{what} is not a number: {value[:40]!r}") from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfidenceMissing(f"{what} is not a number") from None
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ConfidenceMissing(f"{what} is not a probability in [0, 1]: {number!r}")
    return number


def _numbers(values: Any, what: str) -> list[float]:
    if not isinstance(values, list) or not values:
        raise ConfidenceMissing(f"{what} is not a non-empty list")
    return [probability(v, what) for v in values]


class KServeV2Extractor:
    needs_body = True

    def __init__(self, output: str | None, class_index: int | None) -> None:
        self.output = output
        self.class_index = class_index

    def extract(self, answer: Answer) -> float:
        doc = answer.json()
        outputs = doc.get("outputs") if isinstance(doc, dict) else None
        if not isinstance(outputs, list) or not outputs:
            raise ConfidenceMissing("the answer has no KServe V2 outputs")
        if self.output is None:
            chosen = outputs[0]
        else:
            chosen = next(
                (o for o in outputs if isinstance(o, dict) and o.get("name") == self.output),
                None,
            )
            if chosen is None:
                raise ConfidenceMissing(f"the answer has no output named {self.output!r}")
        if not isinstance(chosen, dict):
            raise ConfidenceMissing("the output is not an object")
        data = _numbers(chosen.get("data"), "the output's data")
        shape = chosen.get("shape")
        classes = len(data)
        if (
            isinstance(shape, list)
            and len(shape) >= 2
            and isinstance(shape[-1], int)
            and shape[-1] > 0
        ):
            classes = shape[-1]
        if len(data) % classes:
            raise ConfidenceMissing("the output's data does not match its shape")
        rows = [data[i : i + classes] for i in range(0, len(data), classes)]
        if self.class_index is not None:
            if self.class_index >= classes:
                raise ConfidenceMissing(
                    f"class_index {self.class_index} is out of range ({classes} classes)"
                )
            return min(row[self.class_index] for row in rows)
        return min(max(row) for row in rows)


def _choice(doc: Any) -> dict[str, Any] | None:
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list):
        return None
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return None


def _token_logprobs(choice: dict[str, Any]) -> list[float]:
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return []
    out: list[float] = []
    content = logprobs.get("content")
    if isinstance(content, list):  # chat
        raw = [t.get("logprob") for t in content if isinstance(t, dict)]
    else:  # completions
        token_logprobs = logprobs.get("token_logprobs")
        raw = token_logprobs if isinstance(token_logprobs, list) else []
    for value in raw:
        # The first token of an echoed prompt has a null logprob; it says nothing.
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isnan(value) or value > 0:
                raise ConfidenceMissing(f"a token logprob is not a log probability: {value!r}")
            out.append(value)
    return out


class OpenAILogprobsExtractor:
    needs_body = True

    def __init__(self, aggregate: str) -> None:
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}")
        self.aggregate = aggregate

    def extract(self, answer: Answer) -> float:
        if answer.too_large:
            raise ConfidenceMissing("the answer is larger than the confidence read limit")
        docs = answer.events if answer.events is not None else [answer.json()]
        logprobs: list[float] = []
        for doc in docs:
            choice = _choice(doc)
            if choice is not None:
                logprobs += _token_logprobs(choice)
        if not logprobs:
            raise ConfidenceMissing("the answer has no token logprobs (ask for logprobs)")
        if self.aggregate == "first":
            return math.exp(logprobs[0])
        probabilities = [math.exp(lp) for lp in logprobs]
        if self.aggregate == "min":
            return min(probabilities)
        return min(1.0, sum(probabilities) / len(probabilities))


def compile_json_path(path: str) -> Any:
    """Parse a JSONPath expression; `ValueError` with the parser's message when it is bad."""
    from jsonpath_ng.ext.parser import parse

    try:
        return parse(path)
    except Exception as exc:  # jsonpath-ng raises several types for bad input
        raise ValueError(f"not a valid JSONPath expression: {exc}") from None


class JsonPathExtractor:
    needs_body = True

    def __init__(self, path: str) -> None:
        self.path = path
        self._expr = compile_json_path(path)

    def extract(self, answer: Answer) -> float:
        doc = answer.json()
        try:
            matches = self._expr.find(doc)
        except Exception as exc:
            raise ConfidenceMissing(f"{self.path} could not be evaluated: {exc}") from None
        if not matches:
            raise ConfidenceMissing(f"{self.path} matched nothing")
        return probability(matches[0].value, self.path)


class HeaderExtractor:
    needs_body = False

    def __init__(self, name: str) -> None:
        self.name = name

    def extract(self, answer: Answer) -> float:
        value = answer.header(self.name)
        if value is None:
            raise ConfidenceMissing(f"the answer has no {self.name} header")
        return probability(value, f"the {self.name} header")


def compile_cel(expression: str) -> Any:
    """Compile a CEL expression to a runnable program; `ValueError` when it does not parse."""
    import celpy
    from celpy.celparser import CELParseError

    env = celpy.Environment()
    try:
        ast = env.compile(expression)
    except CELParseError as exc:
        where = ""
        if exc.line is not None and exc.column is not None:
            where = f" at line {exc.line}, column {exc.column}"
        raise ValueError(f"not a valid CEL expression{where}: {expression.strip()!r}") from None
    except Exception as exc:  # lark raises its own errors for some inputs
        raise ValueError(f"not a valid CEL expression: {exc}") from None
    try:
        return env.program(ast)
    except Exception as exc:
        raise ValueError(f"CEL expression cannot be prepared: {exc}") from None


class CelExtractor:
    needs_body = True

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self._program = compile_cel(expression)

    def extract(self, answer: Answer) -> float:
        import celpy
        from celpy.adapter import json_to_cel

        doc = answer.json()
        headers = {k.lower(): v for k, v in answer.headers}
        try:
            activation = {
                "response": json_to_cel(doc),
                "headers": json_to_cel(headers),
            }
            value = self._program.evaluate(activation)
        except Exception as exc:  # CEL evaluation errors come in many types
            value = exc
        if isinstance(value, Exception):
            detail = " ".join(str(value.args[0] if value.args else value).split())[:200]
            raise ConfidenceMissing(f"the CEL expression failed: {detail}")
        if isinstance(value, celpy.celtypes.BoolType):
            raise ConfidenceMissing("the CEL expression gave a bool, not a number")
        return probability(value, "the CEL expression's value")


def build_extractor(config: ExtractConfig) -> Extractor:
    if config.kind == "kserve_v2":
        return KServeV2Extractor(config.output, config.class_index)
    if config.kind == "openai_logprobs":
        return OpenAILogprobsExtractor(config.aggregate)
    if config.kind == "json_path":
        if not config.path:
            raise ValueError("json_path extraction needs a path")
        return JsonPathExtractor(config.path)
    if config.kind == "header":
        return HeaderExtractor(config.header)
    if config.kind == "cel":
        if not config.expression:
            raise ValueError("cel extraction needs an expression")
        return CelExtractor(config.expression)
    raise ValueError(f"unknown confidence extraction kind {config.kind!r}")
