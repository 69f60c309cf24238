"""The agent's HTTP API (token-authenticated) and its heartbeat to the controller."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
from fastapi import Depends, FastAPI, Request

from vmferry.agent.routes import guests, host, ports
from vmferry.agent.service import HostAgent
from vmferry.api.errors import ERROR_RESPONSES
from vmferry.errors import AuthError, VmferryError
from vmferry.http import CONTROLLER_NAME, ClientTls, client_for
from vmferry.web import bearer_token, install_error_handlers, tokens_equal

log = logging.getLogger(__name__)

def create_app(agent: HostAgent, token: str) -> FastAPI:
    def authenticated(request: Request) -> None:
        presented = bearer_token(request)
        if presented is None:
            raise AuthError("missing bearer token")
        if not tokens_equal(presented, token):
            raise AuthError("wrong token for this agent")

    app = FastAPI(title=f"vmferry agent {agent.config.host}", version="1",
                  dependencies=[Depends(authenticated)], responses=ERROR_RESPONSES)
    install_error_handlers(app)
    for routes in (host, guests, ports):
        app.include_router(routes.router(agent))
    return app


class Heartbeat:
    """Reports the host to the controller every ``interval`` seconds, in a daemon thread."""

    def __init__(self, agent: HostAgent, controller: str, token: str,
                 interval: float = 2.0, *, tls: ClientTls | None = None,
                 controller_name: str = CONTROLLER_NAME) -> None:
        self.agent = agent
        self.controller = controller
        self.token = token
        self.tls = tls
        self.controller_name = controller_name
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._api: httpx.Client | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._api is not None:
            self._api.close()

    def beat(self) -> None:
        report = self.agent.report()
        if self._api is None:       # one connection for every beat, opened on the first
            self._api = client_for(self.controller, token=self.token, timeout=5,
                                   tls=self.tls, server_name=self.controller_name)
        self._api.post(f"/v1/agents/{self.agent.config.host}/heartbeat",
                       content=report.model_dump_json(),
                       headers={"content-type": "application/json"}).raise_for_status()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.beat()
                failures = 0
            except (VmferryError, OSError, Exception) as exc:  # keep beating whatever happens
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("heartbeat to %s failed (%d): %s", self.controller, failures, exc)
            self._stop.wait(self.interval)


def run_agent(make: Callable[[], tuple[HostAgent, str]], listens: list[str],
              controller: str | None, *, tls_dir: Path | None = None,
              controller_name: str = CONTROLLER_NAME) -> None:
    """Serve the agent; with ``tls_dir`` over HTTPS, accepting only the controller's
    certificate (CN ``controller_name``), and heartbeats go over HTTPS too."""
    from vmferry.web import ServerTls, serve
    agent, token = make()
    client_tls = ClientTls(tls_dir) if tls_dir is not None else None
    heartbeat = Heartbeat(agent, controller, token, tls=client_tls,
                          controller_name=controller_name) if controller else None
    if heartbeat:
        heartbeat.start()
    server_tls = ServerTls(tls_dir, peers=frozenset({controller_name})) \
        if tls_dir is not None else None
    try:
        serve(create_app(agent, token), listens, tls=server_tls)
    finally:
        if heartbeat:
            heartbeat.stop()
