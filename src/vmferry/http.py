"""HTTP clients for the controller and the agents, over TCP or a unix socket.

Addresses are ``http://HOST:PORT`` or ``unix:/path/to/socket``; agents in the lab listen on
unix sockets because a socket file is reachable from every network namespace.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from vmferry.errors import AgentError, InputError

#: The certificate name (CN) an agent accepts calls from, unless configured otherwise. Here,
#: not in vmferry.agent.app, so that the lab builder (and `vmferry lab ...`) need not load the
#: agent's whole web app for it.
CONTROLLER_NAME = "controller"


@dataclass(frozen=True)
class ClientTls:
    """A client identity from ``tls_dir`` (a ``vmferry pki issue`` directory: ca-cert.pem,
    client-cert.pem, client-key.pem): the server must prove the expected name with a
    certificate of the same CA, and this side presents its own."""

    tls_dir: Path

    def context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=str(self.tls_dir / "ca-cert.pem"))
            ctx.load_cert_chain(self.tls_dir / "client-cert.pem", self.tls_dir / "client-key.pem")
        except (OSError, ssl.SSLError) as exc:
            raise InputError("tls-dir", f"cannot load the certificates in {self.tls_dir} "
                             f"({type(exc).__name__})") from exc
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


def client_for(address: str, *, token: str | None = None,
               timeout: float | httpx.Timeout = 30.0, tls: ClientTls | None = None,
               server_name: str | None = None) -> httpx.Client:
    """An httpx client for ``address``, sending ``token`` as a bearer token. With ``tls``
    the connection is HTTPS (also over a unix socket) and the server's certificate must name
    ``server_name`` (default: the URL's host)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        if tls is not None:
            # TLS over the socket: the URL's host is the name the certificate must carry.
            transport = httpx.HTTPTransport(uds=path, verify=tls.context())
            return httpx.Client(transport=transport, base_url=f"https://{server_name or 'vmferry'}",
                                headers=headers, timeout=timeout)
        # Plain unix sockets carry no TLS: skip building a certificate store (~25 ms a client).
        transport = httpx.HTTPTransport(uds=path, verify=False)
        return httpx.Client(transport=transport, base_url="http://vmferry.local",
                            headers=headers, timeout=timeout, verify=False)
    if address.startswith("http://"):
        if tls is not None:
            raise InputError("address", f"{address!r}: TLS is configured, use https://")
        return httpx.Client(base_url=address.rstrip("/"), headers=headers, timeout=timeout,
                            verify=False)
    if address.startswith("https://"):
        verify: ssl.SSLContext | bool = tls.context() if tls is not None else True
        return httpx.Client(base_url=address.rstrip("/"), headers=headers, timeout=timeout,
                            verify=verify)
    raise InputError("address", f"{address!r} is neither http(s)://HOST:PORT nor unix:/PATH")


def error_payload(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"message": response.text[:500] or response.reason_phrase}
    if isinstance(body, dict):
        detail = body.get("detail", body)
        if isinstance(detail, dict):
            return detail
        return {"message": str(detail)}
    return {"message": str(body)}


def raise_for_agent(host: str, response: httpx.Response) -> None:
    """Turn an agent's error answer into AgentError carrying the agent's message."""
    if response.is_success:
        return
    payload = error_payload(response)
    raise AgentError(f"agent on {host}: {payload.get('message', response.reason_phrase)}",
                     host=host, status=response.status_code, agent_error=payload)
