"""The error body both APIs answer with (``vmferry.web.install_error_handlers``), declared in
their OpenAPI so that a client (and the API fuzz) can check every refusal against it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["ERROR_RESPONSES", "ErrorDetail", "ErrorOut"]


class ErrorDetail(BaseModel):
    """What went wrong: the error's class, a message, and for bad input the field (a dotted
    path) and the reason. Errors may carry more fields of their own (``vm``, ``host``...)."""

    model_config = ConfigDict(extra="allow")
    error: str
    message: str
    field: str | None = None
    reason: str | None = None


class ErrorOut(BaseModel):
    detail: ErrorDetail


_STATUSES = {
    400: "A header could not be parsed (Content-Length, ...)",
    401: "Missing, unknown, revoked or expired token",
    403: "The token's role may not do this",
    404: "No such VM, host, migration, token or profile",
    409: "Conflicts with the current state (a name in use, a busy VM, no capacity, "
         "a host that does not answer)",
    413: "The body is larger than a megabyte",
    415: "The body is not JSON",
    422: "Bad input: the field and the reason",
    429: "The caller's share of long waits or streams is used up",
}

#: Every error an operation of either API may answer, for FastAPI's ``responses=``.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": description}
    for status, description in _STATUSES.items()
}
