"""The agent's HTTP API (token-authenticated) and its heartbeat to the controller."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from vmferry.agent.models import GuestInfo, GuestRequest, HostReport, MigrateRequest, UplinkVlans
from vmferry.agent.service import HostAgent
from vmferry.errors import AuthError, InputError, VmferryError
from vmferry.http import client_for
from vmferry.model.network import MacAddress, VlanId
from vmferry.web import bearer_token, install_error_handlers, tokens_equal

log = logging.getLogger(__name__)


class SwitchoverRules(BaseModel):
    """The destination's temporary rule during a make-before-break switchover."""

    model_config = ConfigDict(extra="forbid")
    cookie: int = Field(ge=1, le=2**64 - 2)
    vlan: VlanId
    mac: MacAddress


class PortProfiles(BaseModel):
    """One profile for many guests' ports at once (a live profile update)."""

    model_config = ConfigDict(extra="forbid")
    profile: dict[str, Any]
    vms: list[str] = Field(min_length=1, max_length=4096)


def create_app(agent: HostAgent, token: str) -> FastAPI:
    def authenticated(request: Request) -> None:
        presented = bearer_token(request)
        if presented is None:
            raise AuthError("missing bearer token")
        if not tokens_equal(presented, token):
            raise AuthError("wrong token for this agent")

    app = FastAPI(title=f"vmferry agent {agent.config.host}", version="1",
                  dependencies=[Depends(authenticated)])
    install_error_handlers(app)

    @app.get("/v1/report", response_model=HostReport)
    def report() -> HostReport:
        return agent.report()

    @app.get("/v1/guests", response_model=list[GuestInfo])
    def guests() -> list[GuestInfo]:
        return agent.guests()

    @app.put("/v1/guests/{name}", response_model=GuestInfo)
    def create_guest(name: str, body: GuestRequest) -> GuestInfo:
        if body.name != name:
            raise InputError("name", "does not match the URL")
        return agent.create_guest(body)

    @app.put("/v1/ports/{name}", response_model=GuestInfo)
    def preset_port(name: str, body: GuestRequest) -> GuestInfo:
        if body.name != name:
            raise InputError("name", "does not match the URL")
        return agent.preset_port(body)

    @app.put("/v1/ports/{name}/profile")
    def set_port_profile(name: str, body: dict[str, Any]) -> dict[str, Any]:
        return agent.set_port_profile(name, body.get("profile"))

    @app.put("/v1/port-profiles")
    def set_port_profiles(body: PortProfiles) -> dict[str, Any]:
        return {"ports": agent.set_port_profiles(body.vms, body.profile)}

    @app.get("/v1/ports/{name}")
    def port_status(name: str) -> dict[str, Any]:
        return agent.port_status(name)

    @app.post("/v1/guests/{name}/migration/postcopy", status_code=202)
    def postcopy(name: str) -> dict[str, str]:
        agent.start_postcopy(name)
        return {"status": "postcopy"}

    @app.get("/v1/guests/{name}", response_model=GuestInfo)
    def guest(name: str) -> GuestInfo:
        return agent.guest(name)

    @app.delete("/v1/guests/{name}", status_code=204)
    def delete_guest(name: str) -> None:
        agent.delete_guest(name)

    @app.post("/v1/guests/{name}/migrate", status_code=202)
    def migrate(name: str, body: MigrateRequest) -> dict[str, str]:
        agent.migrate(name, body)
        return {"status": "started"}

    @app.get("/v1/guests/{name}/migration")
    def migration(name: str) -> dict[str, Any]:
        progress = agent.migration_progress(name)
        return progress.__dict__

    @app.post("/v1/guests/{name}/migration/cancel", status_code=202)
    def cancel(name: str) -> dict[str, str]:
        agent.cancel_migration(name)
        return {"status": "cancelling"}

    @app.post("/v1/guests/{name}/resume", status_code=202)
    def resume(name: str) -> dict[str, str]:
        agent.resume(name)
        return {"status": "running"}

    @app.post("/v1/guests/{name}/announce", status_code=202)
    def announce(name: str) -> dict[str, str]:
        agent.announce(name)
        return {"status": "announced"}

    @app.get("/v1/audit")
    def audit() -> dict[str, list[str]]:
        return agent.inventory_of_leftovers()

    @app.delete("/v1/taps/{name}", status_code=204)
    def delete_tap(name: str) -> None:
        agent.delete_stray_tap(name)

    @app.put("/v1/make-before-break/{name}")
    def open_switchover(name: str, body: SwitchoverRules) -> dict[str, int]:
        return {"rules": agent.open_switchover(name, body.cookie, body.vlan, str(body.mac))}

    @app.delete("/v1/make-before-break/{cookie}", status_code=204)
    def close_switchover(cookie: int) -> None:
        agent.close_switchover(cookie)

    @app.get("/v1/make-before-break")
    def switchover_cookies() -> dict[str, list[int]]:
        return {"cookies": agent.switchover_cookies()}

    @app.get("/v1/uplink")
    def uplink() -> dict[str, list[int]]:
        return {"vlans": agent.uplink_vlans()}

    @app.put("/v1/uplink")
    def set_uplink(body: UplinkVlans) -> dict[str, list[int]]:
        return {"vlans": agent.set_uplink_vlans(body.vlans)}

    return app


class Heartbeat:
    """Reports the host to the controller every ``interval`` seconds, in a daemon thread."""

    def __init__(self, agent: HostAgent, controller: str, token: str,
                 interval: float = 2.0) -> None:
        self.agent = agent
        self.controller = controller
        self.token = token
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def beat(self) -> None:
        report = self.agent.report()
        with client_for(self.controller, token=self.token, timeout=5) as api:
            api.post(f"/v1/agents/{self.agent.config.host}/heartbeat",
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
              controller: str | None) -> None:
    from vmferry.web import serve
    agent, token = make()
    heartbeat = Heartbeat(agent, controller, token) if controller else None
    if heartbeat:
        heartbeat.start()
    try:
        serve(create_app(agent, token), listens)
    finally:
        if heartbeat:
            heartbeat.stop()
