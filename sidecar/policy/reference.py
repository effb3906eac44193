"""Generate `docs/policy-reference.md` from the pydantic policy models, so the reference cannot
drift from the code: every field with its type, default, constraints and description.

`make docs` writes the file; a test fails when the committed file differs from what this module
generates.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from sidecar.policy.schema import Policy
from sidecar.policy.units import format_duration

__all__ = ["generate_reference"]

_HEADER = """# Policy reference

Generated from the policy models by `make docs` (`python -m sidecar.policy.reference`); do not edit
by hand. Durations are written like `250ms`, `2s`, `5m`, `1h` (or a number of seconds); sizes like
`4096`, `64KiB`, `1MiB`. Unknown keys are errors. `sidecar validate FILE` checks a file and
`sidecar schema` prints the JSON Schema.
"""


def _type_name(annotation: Any, metadata: list[Any]) -> str:
    meta_names = {type(m).__name__ for m in metadata}
    if "BeforeValidator" in meta_names:
        pass
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        inner, *extra = args
        names = " ".join(repr(e) for e in extra)
        if "parse_duration" in names:
            return "duration"
        if "parse_size" in names:
            return "size"
        return _type_name(inner, [])
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a, []) for a in args if a is not type(None)]
        text = " | ".join(parts)
        return f"{text} (optional)" if type(None) in args else text
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return f"list of {_type_name(inner[0], [])}" if inner else "list"
    if origin is dict:
        return f"map of name → {_type_name(args[1], [])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation).replace("typing.", "")


def _default(info: FieldInfo, type_text: str) -> str:
    if info.default_factory is not None:
        try:
            value = info.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(see type)"
        if isinstance(value, BaseModel):
            return "(all defaults)"
        return f"`{value!r}`"
    if info.default is PydanticUndefined:
        return "**required**"
    value = info.default
    if value is None:
        return "none"
    if type_text.startswith("duration") and isinstance(value, int | float):
        return f"`{format_duration(float(value))}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _constraints(info: FieldInfo) -> str:
    out = []
    for m in info.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if hasattr(m, attr) and getattr(m, attr) is not None:
                out.append(f"{sym} {getattr(m, attr)}")
        for attr in ("min_length", "max_length", "pattern"):
            if hasattr(m, attr) and getattr(m, attr) is not None:
                out.append(f"{attr} {getattr(m, attr)}")
    return ", ".join(out)


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in seen:
                seen.append(annotation)
                for f in annotation.model_fields.values():
                    visit(f.annotation)
            return
        for arg in typing.get_args(annotation):
            visit(arg)

    visit(root)
    return seen


def _model_doc(annotation: Any) -> str:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return (annotation.__doc__ or "").strip().split("\n")[0]
    for arg in typing.get_args(annotation):
        doc = _model_doc(arg)
        if doc:
            return doc
    return ""


def generate_reference() -> str:
    lines = [_HEADER]
    for model in _models(Policy):
        lines.append(f"## {model.__name__}\n")
        doc = (model.__doc__ or "").strip()
        if doc:
            lines.append(doc + "\n")
        lines.append("| field | type | default | constraints | description |")
        lines.append("|---|---|---|---|---|")
        for name, info in model.model_fields.items():
            key = info.alias or name
            type_text = _type_name(info.annotation, list(info.metadata))
            if any("parse_duration" in repr(m) for m in info.metadata):
                type_text = "duration" + (" (optional)" if "optional" in type_text else "")
            if any("parse_size" in repr(m) for m in info.metadata):
                type_text = "size"
            desc = info.description or _model_doc(info.annotation)
            desc = desc.replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| `{key}` | {type_text} | {_default(info, type_text)} | "
                f"{_constraints(info)} | {desc} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    import sys
    from pathlib import Path

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/policy-reference.md")
    target.write_text(generate_reference(), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
