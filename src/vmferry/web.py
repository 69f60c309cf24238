"""What the controller's and the agents' HTTP apps share: error answers, auth, serving."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vmferry.errors import InputError, TooManyRequests, VmferryError
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
        # The log has the traceback; the caller gets no internals (paths, SQL, secrets).
        log.exception("unexpected error")
        return JSONResponse(status_code=500, content={"detail": {
            "error": "InternalError", "message": "internal error; see the server's log"}})


class RateLimitedLog:
    """Logs at most ``burst`` messages per ``period`` seconds and counts the rest, so a flood
    of refused requests cannot fill the disk or hold the event loop in logging."""

    def __init__(self, logger: logging.Logger, *, burst: int = 10, period: float = 10.0) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        self._window = 0.0
        self._count = 0
        self._suppressed = 0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Whether one more message fits in the current window (counts it if not)."""
        now = time.monotonic()
        with self._lock:
            if now - self._window >= self.period:
                if self._suppressed:
                    self.logger.warning("%d more refusals in the last %.0f s not logged",
                                        self._suppressed, self.period)
                self._window, self._count, self._suppressed = now, 0, 0
            if self._count >= self.burst:
                self._suppressed += 1
                return False
            self._count += 1
            return True

    def note(self, message: str) -> None:
        if self.allow():
            self.logger.warning("refused: %s", message)


refusals = RateLimitedLog(log)


class ConcurrencyCap:
    """At most ``per_key`` concurrent uses per caller and ``total`` in all (long waits, event
    streams): one more is refused with 429 naming ``field`` instead of queueing, so no caller
    can hold every worker (heartbeats included). Thread-safe."""

    def __init__(self, field: str, *, per_key: int, total: int) -> None:
        self.field = field
        self.per_key = per_key
        self.total = total
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> None:
        """Take a slot for ``key``; raises TooManyRequests when none is free."""
        with self._lock:
            mine = self._used.get(key, 0)
            if mine >= self.per_key:
                raise TooManyRequests(self.field, f"at most {self.per_key} at once per caller")
            if sum(self._used.values()) >= self.total:
                raise TooManyRequests(self.field, f"at most {self.total} at once; try later")
            self._used[key] = mine + 1

    def release(self, key: str) -> None:
        with self._lock:
            left = self._used.get(key, 0) - 1
            if left > 0:
                self._used[key] = left
            else:
                self._used.pop(key, None)

    def in_use(self, key: str | None = None) -> int:
        with self._lock:
            return self._used.get(key, 0) if key is not None else sum(self._used.values())


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
        if not host or not re.fullmatch(r"[0-9]{1,5}", port):
            raise InputError("listen", f"{listen!r} is neither HOST:PORT nor unix:/PATH")
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), int(port)))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@dataclass(frozen=True)
class ServerTls:
    """HTTPS with client certificates from ``tls_dir`` (a ``vmferry pki issue`` directory:
    ca-cert.pem, server-cert.pem, server-key.pem). Every client must present a certificate
    signed by the CA; with ``peers``, its CN must also be one of them (else the connection is
    closed before any HTTP is read)."""

    tls_dir: Path
    peers: frozenset[str] | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.tls_dir / "server-cert.pem", self.tls_dir / "server-key.pem")
            ctx.load_verify_locations(cafile=self.tls_dir / "ca-cert.pem")
        except (OSError, ssl.SSLError) as exc:
            raise InputError("tls-dir", f"cannot load the certificates in {self.tls_dir} "
                             f"({type(exc).__name__})") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def peer_common_name(transport: asyncio.BaseTransport) -> str | None:
    """The CN of the verified client certificate of a TLS connection."""
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def peer_checking_protocol(peers: frozenset[str]) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol that drops a connection whose certificate names another peer
    (asyncio calls ``connection_made`` once the TLS handshake has verified the chain)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class PeerChecking(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            name = peer_common_name(transport)
            if name not in peers:
                refusals.note(f"TLS peer {name!r} is not one of {sorted(peers)}")
                transport.close()

    return PeerChecking


def serve(app: FastAPI, listens: list[str], *, tls: ServerTls | None = None,
          plain: list[str] | None = None, log_level: str = "warning") -> None:
    """Serve ``app`` on every address of ``listens`` (over HTTPS with ``tls``) and of
    ``plain`` (plain HTTP: for a loopback address that users reach with a bearer token)."""
    groups: list[tuple[list[socket.socket], dict[str, Any]]] = []
    options: dict[str, Any] = {}
    if tls is not None:
        context = tls.context()
        options["ssl_context_factory"] = lambda _config, _default: context
        if tls.peers is not None:
            options["http"] = peer_checking_protocol(tls.peers)
    groups.append(([make_socket(listen) for listen in listens], options))
    if plain:
        groups.append(([make_socket(listen) for listen in plain], {}))
    servers = [(uvicorn.Server(uvicorn.Config(
        app, log_level=log_level, access_log=False, timeout_keep_alive=30,
        limit_concurrency=256, **extra)), sockets) for sockets, extra in groups if sockets]
    asyncio.run(_serve_all(servers))


async def _serve_all(servers: list[tuple[uvicorn.Server, list[socket.socket]]]) -> None:
    """Run the servers side by side; when one stops (a signal), the others stop too."""
    tasks = [asyncio.create_task(server.serve(sockets=sockets)) for server, sockets in servers]
    _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server, _sockets in servers:
        server.should_exit = True
    if pending:
        await asyncio.wait(pending)


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
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        raw_length = headers.get("content-length")
        length = parse_content_length(raw_length)
        if raw_length is not None and length is None:
            await _refuse(send, 400, "Content-Length must be a decimal number",
                          field="content-length")
            return
        if length is not None and length > self.max_bytes:
            await _refuse(send, 413, f"larger than {self.max_bytes} bytes")
            return
        has_body = (length is not None and length > 0) or "transfer-encoding" in headers
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


_DECIMAL = re.compile(r"^[0-9]{1,18}$")     # ASCII digits only: "²".isdigit() is True


def parse_content_length(value: str | None) -> int | None:
    """The header's value as a number, None when absent or not plain ASCII digits."""
    if value is None or not _DECIMAL.match(value.strip()):
        return None
    return int(value.strip())


def parse_decimal(value: str | None) -> int | None:
    """A header's non-negative decimal value (Last-Event-ID, ...); None when not one."""
    return parse_content_length(value)


async def _refuse(send: Any, status: int, reason: str, field: str = "body") -> None:
    body = json.dumps({"detail": InputError(field, reason).to_dict()}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
