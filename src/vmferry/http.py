"""HTTP clients for the controller and the agents, over TCP or a unix socket.

Addresses are ``http://HOST:PORT`` or ``unix:/path/to/socket``; agents in the lab listen on
unix sockets because a socket file is reachable from every network namespace.
"""

from __future__ import annotations

from typing import Any

import httpx

from vmferry.errors import AgentError, InputError


def client_for(address: str, *, token: str | None = None,
               timeout: float | httpx.Timeout = 30.0) -> httpx.Client:
    """An httpx client for ``address``, sending ``token`` as a bearer token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # Plain HTTP and unix sockets carry no TLS: skip building a certificate store, which costs
    # ~25 ms per client and would be paid on every call to an agent.
    if address.startswith("unix:"):
        transport = httpx.HTTPTransport(uds=address.removeprefix("unix:"), verify=False)
        return httpx.Client(transport=transport, base_url="http://vmferry.local",
                            headers=headers, timeout=timeout, verify=False)
    if address.startswith("http://"):
        return httpx.Client(base_url=address.rstrip("/"), headers=headers, timeout=timeout,
                            verify=False)
    if address.startswith("https://"):
        return httpx.Client(base_url=address.rstrip("/"), headers=headers, timeout=timeout)
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
