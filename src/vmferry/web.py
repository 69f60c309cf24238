"""What the controller's and the agents' HTTP apps share: error answers, auth, serving."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vmferry.errors import InputError, VmferryError
from vmferry.model.validation import field_path

log = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    """Every error becomes JSON naming the field and the reason; never a traceback. Bodies
    must be JSON and at most a megabyte."""
    app.add_middleware(RequestLimits)

    @app.exception_handler(VmferryError)
    async def _vmferry(_request: Request, exc: VmferryError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status, content={"detail": exc.to_dict()})

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            loc = tuple(error.get("loc", ()))
            reason = "unknown field" if error.get("type") == "extra_forbidden" else \
                str(error.get("msg", "invalid")).removeprefix("Value error, ")
            problems.append({"field": field_path(loc), "reason": reason})
        first = problems[0] if problems else {"field": "body", "reason": "invalid"}
        err = InputError(first["field"], first["reason"], problems=problems)
        return JSONResponse(status_code=422, content={"detail": err.to_dict()})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail: Any = exc.detail
        if not isinstance(detail, dict):
            detail = {"error": "HTTPError", "message": str(detail)}
        return JSONResponse(status_code=exc.status_code, content={"detail": detail},
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(status_code=500, content={"detail": {
            "error": "InternalError", "message": f"{type(exc).__name__}: {exc}"}})


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def tokens_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def read_token_file(path: str | Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise InputError("token-file", f"cannot read {path}: {exc.strerror}") from exc
    if not token:
        raise InputError("token-file", f"{path} is empty")
    return token


def make_socket(listen: str) -> socket.socket:
    """A listening socket for ``HOST:PORT`` or ``unix:/path``."""
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:")
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o600)
    else:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit():
            raise InputError("listen", f"{listen!r} is neither HOST:PORT nor unix:/PATH")
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), int(port)))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(app: FastAPI, listens: list[str], *, log_level: str = "warning") -> None:
    """Serve ``app`` on every address of ``listens`` from one uvicorn server."""
    sockets = [make_socket(listen) for listen in listens]
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_keep_alive=30,
                            limit_concurrency=256)
    server = uvicorn.Server(config)
    asyncio.run(server.serve(sockets=sockets))


MAX_BODY_BYTES = 1024 * 1024
BODY_METHODS = {"POST", "PUT", "PATCH"}


class RequestLimits:
    """ASGI middleware: a body must be JSON and at most ``max_bytes`` long (413/415 otherwise,
    with the field and the reason like every other refusal)."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _refuse(send, 413, f"larger than {self.max_bytes} bytes")
            return
        has_body = (length is not None and int(length) > 0) or "transfer-encoding" in headers
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if has_body and media != "application/json":
            await _refuse(send, 415, f"Content-Type must be application/json, not "
                          f"{media or 'missing'!r}")
            return
        seen = 0

        async def bounded_receive() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, bounded_receive, send)
        except _TooLarge:
            await _refuse(send, 413, f"larger than {self.max_bytes} bytes")


class _TooLarge(Exception):
    pass


async def _refuse(send: Any, status: int, reason: str) -> None:
    body = json.dumps({"detail": InputError("body", reason).to_dict()}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
