"""CEL predicates for the `rules` fallback: compiled once when the policy loads, evaluated over
the request.

The only module that imports `celpy` (cel-python, a maintained CEL implementation): expressions
are parsed and type-checked by CEL's own grammar, never `eval`-ed. An expression sees `request`
(the request body as JSON, null when it is not JSON), `method`, `path` and `headers` (names in
lower case). A predicate that fails to evaluate (a missing field, a type mismatch) does not match.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["CelCompileError", "CelEvalError", "CelPredicate"]


class CelCompileError(ValueError):
    """An expression that is not valid CEL; `line` and `column` point at the problem."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


class CelEvalError(Exception):
    """An expression that could not be evaluated for this request."""


class CelPredicate:
    """One compiled CEL expression that must evaluate to a bool."""

    def __init__(self, source: str) -> None:
        import celpy
        from celpy.celparser import CELParseError

        self.source = source
        env = celpy.Environment()
        try:
            ast = env.compile(source)
        except CELParseError as exc:
            where = ""
            if exc.line is not None and exc.column is not None:
                where = f" at line {exc.line}, column {exc.column}"
            raise CelCompileError(
                f"not a valid CEL expression{where}: {source.strip()!r}", exc.line, exc.column
            ) from None
        except Exception as exc:  # lark raises its own errors for some inputs
            raise CelCompileError(f"not a valid CEL expression: {exc}") from None
        try:
            self._program = env.program(ast)
        except Exception as exc:
            raise CelCompileError(f"CEL expression cannot be prepared: {exc}") from None

    def matches(self, activation: Mapping[str, Any]) -> bool:
        """True when the expression holds; raise `CelEvalError` when it cannot be evaluated or
        is not a bool."""
        import celpy
        from celpy.adapter import json_to_cel

        try:
            values = {name: json_to_cel(value) for name, value in activation.items()}
            result = self._program.evaluate(values)
        except Exception as exc:
            raise CelEvalError(str(exc.args[0] if exc.args else exc)) from None
        if isinstance(result, Exception):
            raise CelEvalError(str(result))
        if not isinstance(result, bool | celpy.celtypes.BoolType):
            raise CelEvalError(f"expression gave {type(result).__name__}, not a bool")
        return bool(result)
