"""Turning pydantic's validation errors into vmferry's InputError (field path + reason)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from vmferry.errors import InputError

M = TypeVar("M", bound=BaseModel)


def field_path(loc: tuple[Any, ...], prefix: str = "") -> str:
    parts = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts) or "body"


def input_error_from(exc: ValidationError, prefix: str = "") -> InputError:
    """The first problem of a ValidationError as an InputError; all of them in ``problems``."""
    problems = [{"field": field_path(tuple(e["loc"]), prefix), "reason": _reason(e)}
                for e in exc.errors()]
    first = problems[0]
    return InputError(first["field"], first["reason"], problems=problems)


def _reason(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def parse(model: type[M], data: Any, prefix: str = "") -> M:
    """Validate ``data`` as ``model``; raises InputError naming the field and the reason."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise input_error_from(exc, prefix) from exc
