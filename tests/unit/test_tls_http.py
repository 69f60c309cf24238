"""HTTPS with client certificates over a unix socket: the server accepts only the named peer,
the client checks the server's name (vmferry.web.ServerTls, vmferry.http.ClientTls)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from vmferry import pki
from vmferry.http import ClientTls, client_for
from vmferry.web import ServerTls, make_socket, peer_checking_protocol


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    pki_dir = tmp_path / "pki"
    pki.init_ca(pki_dir)
    for name in ("host1", "controller", "host2"):
        pki.issue(pki_dir, name)
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict[str, str]:
        return {"pong": "yes"}

    tls = ServerTls(pki_dir / "certs" / "host1", peers=frozenset({"controller"}))
    context = tls.context()
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", ssl_context_factory=lambda _c, _d: context,
        http=peer_checking_protocol(frozenset({"controller"}))))
    sock_path = tmp_path / "agent.sock"
    sock = make_socket(f"unix:{sock_path}")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield pki_dir, sock_path
    server.should_exit = True
    thread.join(5)


def test_only_the_named_peer_gets_an_answer(served: tuple[Path, Path]) -> None:
    pki_dir, sock = served
    address = f"unix:{sock}"
    with client_for(address, tls=ClientTls(pki_dir / "certs" / "controller"),
                    server_name="host1") as controller:
        assert controller.get("/ping").json() == {"pong": "yes"}
    with client_for(address, tls=ClientTls(pki_dir / "certs" / "host2"),
                    server_name="host1") as other, pytest.raises(httpx.HTTPError):
        other.get("/ping")
    with client_for(address) as plain, pytest.raises(httpx.HTTPError):
        plain.get("/ping")
    # The server must prove the expected name: host1's certificate does not say host9.
    with client_for(address, tls=ClientTls(pki_dir / "certs" / "controller"),
                    server_name="host9") as wrong_name, pytest.raises(httpx.HTTPError):
        wrong_name.get("/ping")
