"""``AgentClient``: the one way to talk to a host agent, typed end to end.

One client per host, holding one pooled HTTP connection (TCP or a unix socket, see
``vmferry.http``) for its lifetime; ``AgentClients`` keeps them for a whole site and rebuilds a
host's client only when its address or token file changes in the inventory. Transport errors
become ``HostUnavailableError``, error answers ``AgentError`` (with the HTTP status).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from vmferry.api.agent import (
    MAX_EVENTS_WAIT_S,
    AuxNic,
    ConnCarried,
    ConnState,
    GuestEvent,
    GuestInfo,
    GuestRequest,
    HostLeftovers,
    HostReport,
    MemcheckVerdict,
    MigrateRequest,
    MigrationProgress,
    MigrationResume,
    PortOutcome,
    PortOutcomes,
    PortProfileBody,
    PortProfiles,
    PortStatus,
    Realization,
    RecoveryListening,
    SwitchoverCookies,
    SwitchoverRules,
    SwitchoverRulesOut,
    UplinkVlans,
)
from vmferry.errors import AgentError, HostUnavailableError
from vmferry.http import ClientTls, client_for, raise_for_agent
from vmferry.model.profile import PortProfile
from vmferry.model.topology import Host, Topology

M = TypeVar("M", bound=BaseModel)
_EVENTS = TypeAdapter(list[GuestEvent])
_GUESTS = TypeAdapter(list[GuestInfo])
DEFAULT_TIMEOUT_S = 30.0
START_TIMEOUT_S = 120.0       # starting QEMU (and its incoming listener) under TCG is slow

# Builds the transport to a host (tests: an in-process ASGI transport); None: by address.
TransportFactory = Callable[[str], httpx.BaseTransport]


class AgentClient:
    """Typed calls to one host's agent. Thread-safe; close it when done."""

    def __init__(self, host: str, address: str, token: str | None, *,
                 transport: httpx.BaseTransport | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, tls: ClientTls | None = None) -> None:
        self.host = host
        self.address = address
        if transport is not None:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            self._http = httpx.Client(transport=transport, base_url="http://vmferry.agent",
                                      headers=headers, timeout=timeout)
        else:
            # With TLS the agent's certificate must name its host.
            self._http = client_for(address, token=token, timeout=timeout, tls=tls,
                                    server_name=host)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing -----------------------------------------------------------------------------

    def request(self, method: str, path: str, *, body: BaseModel | None = None,
                params: dict[str, Any] | None = None,
                timeout: float | None = None) -> httpx.Response:
        """One request; raises ``HostUnavailableError`` or ``AgentError``."""
        content = body.model_dump_json() if body is not None else None
        headers = {"content-type": "application/json"} if content is not None else None
        try:
            response = self._http.request(
                method, path, content=content, headers=headers, params=params,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        except httpx.HTTPError as exc:
            raise HostUnavailableError(f"host {self.host}: its agent does not answer ({exc})",
                                       host=self.host) from exc
        raise_for_agent(self.host, response)
        return response

    def _get(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate_json(self.request(method, path, **kwargs).content)

    # ---- host ---------------------------------------------------------------------------------

    def report(self, timeout: float = 15) -> HostReport:
        return self._get(HostReport, "GET", "/v1/report", timeout=timeout)

    def leftovers(self) -> HostLeftovers:
        return self._get(HostLeftovers, "GET", "/v1/audit", timeout=15)

    def delete_tap(self, tap: str) -> None:
        self.request("DELETE", f"/v1/taps/{tap}")

    def uplink_vlans(self, timeout: float | None = None) -> list[int]:
        return self._get(UplinkVlans, "GET", "/v1/uplink", timeout=timeout).vlans

    def set_uplink_vlans(self, vlans: list[int]) -> list[int]:
        return self._get(UplinkVlans, "PUT", "/v1/uplink",
                         body=UplinkVlans(vlans=sorted(vlans))).vlans

    # ---- guests -------------------------------------------------------------------------------

    def guests(self) -> list[GuestInfo]:
        return _GUESTS.validate_json(self.request("GET", "/v1/guests").content)

    def guest(self, vm: str, timeout: float | None = None) -> GuestInfo:
        return self._get(GuestInfo, "GET", f"/v1/guests/{vm}", timeout=timeout)

    def guest_state(self, vm: str) -> str:
        """The guest's run state; "absent" when the agent knows no such guest."""
        try:
            return self.guest(vm).state
        except AgentError as exc:
            if exc.fields.get("status") == 404:
                return "absent"
            raise

    def create_guest(self, request: GuestRequest) -> GuestInfo:
        return self._get(GuestInfo, "PUT", f"/v1/guests/{request.name}", body=request,
                         timeout=START_TIMEOUT_S)

    def preset_port(self, request: GuestRequest) -> GuestInfo:
        return self._get(GuestInfo, "PUT", f"/v1/ports/{request.name}", body=request)

    def plug_nic(self, vm: str, nic: AuxNic) -> GuestInfo:
        """Hot-plug ``vm``'s second NIC with its port (a move by dual NIC)."""
        return self._get(GuestInfo, "PUT", f"/v1/guests/{vm}/second-nic", body=nic,
                         timeout=60)

    def unplug_nic(self, vm: str) -> GuestInfo:
        """Hot-unplug ``vm``'s second NIC and remove its port and tap (idempotent)."""
        return self._get(GuestInfo, "DELETE", f"/v1/guests/{vm}/second-nic", timeout=60)

    def delete_guest(self, vm: str) -> None:
        self.request("DELETE", f"/v1/guests/{vm}", timeout=60)

    def resume(self, vm: str) -> None:
        self.request("POST", f"/v1/guests/{vm}/resume")

    def announce(self, vm: str) -> None:
        self.request("POST", f"/v1/guests/{vm}/announce")

    # ---- ports and profiles -------------------------------------------------------------------

    def port_status(self, vm: str) -> PortStatus:
        return self._get(PortStatus, "GET", f"/v1/ports/{vm}")

    def set_port_profile(self, vm: str, profile: PortProfile | None) -> Realization:
        return self._get(Realization, "PUT", f"/v1/ports/{vm}/profile",
                         body=PortProfileBody(profile=profile), timeout=60)

    def set_port_profiles(self, vms: list[str], profile: PortProfile) -> list[PortOutcome]:
        return self._get(PortOutcomes, "PUT", "/v1/port-profiles",
                         body=PortProfiles(profile=profile, vms=vms),
                         timeout=60 + len(vms)).ports

    # ---- migration ----------------------------------------------------------------------------

    def migrate(self, vm: str, request: MigrateRequest) -> None:
        self.request("POST", f"/v1/guests/{vm}/migrate", body=request)

    def memcheck(self, vm: str) -> MemcheckVerdict:
        """The guest's memory-check verdict from its console on this host."""
        return self._get(MemcheckVerdict, "GET", f"/v1/guests/{vm}/memcheck", timeout=15)

    def migration(self, vm: str) -> MigrationProgress:
        return self._get(MigrationProgress, "GET", f"/v1/guests/{vm}/migration")

    def cancel_migration(self, vm: str) -> None:
        self.request("POST", f"/v1/guests/{vm}/migration/cancel")

    def start_postcopy(self, vm: str) -> None:
        self.request("POST", f"/v1/guests/{vm}/migration/postcopy")

    def continue_migration(self, vm: str) -> None:
        self.request("POST", f"/v1/guests/{vm}/migration/continue")

    def pause_migration(self, vm: str) -> None:
        """migrate-pause: a postcopy's hung stream is broken and this end pauses."""
        self.request("POST", f"/v1/guests/{vm}/migration/pause")

    def recover_incoming(self, vm: str) -> str:
        """migrate-recover on the destination; returns the URI it listens on."""
        return self._get(RecoveryListening, "POST", f"/v1/guests/{vm}/migration/recover").uri

    def resume_migration(self, vm: str, uri: str) -> None:
        """migrate with resume on the source, to ``uri``."""
        self.request("POST", f"/v1/guests/{vm}/migration/resume",
                     body=MigrationResume(uri=uri))

    def guest_events(self, vm: str, after: int, wait: float) -> list[GuestEvent]:
        """The guest's events after ``after`` (waits up to ``wait`` s for one)."""
        wait = max(0.0, min(wait, MAX_EVENTS_WAIT_S))
        response = self.request("GET", f"/v1/guests/{vm}/events",
                                params={"after": after, "wait": wait}, timeout=wait + 15)
        return _EVENTS.validate_json(response.content)

    # ---- make-before-break switchover (contract H4) -------------------------------------------

    def open_switchover(self, vm: str, cookie: int, vlan: int, mac: str) -> int:
        body = SwitchoverRules.model_validate({"cookie": cookie, "vlan": vlan, "mac": mac})
        return self._get(SwitchoverRulesOut, "PUT", f"/v1/make-before-break/{vm}",
                         body=body, timeout=15).rules

    def close_switchover(self, cookie: int) -> None:
        self.request("DELETE", f"/v1/make-before-break/{cookie}", timeout=15)

    def conntrack(self, vm: str) -> ConnState:
        """The tracked connections of the guest's port on this host."""
        return self._get(ConnState, "GET", f"/v1/ports/{vm}/conntrack", timeout=15)

    def carry_conntrack(self, vm: str, state: ConnState) -> int:
        """Carry ``state`` to the guest's port here; returns the number of carry flows."""
        return self._get(ConnCarried, "PUT", f"/v1/ports/{vm}/conntrack", body=state,
                         timeout=30).flows

    def drop_carried_conntrack(self, vm: str) -> None:
        self.request("DELETE", f"/v1/ports/{vm}/conntrack", timeout=15)

    def switchover_cookies(self) -> list[int]:
        return self._get(SwitchoverCookies, "GET", "/v1/make-before-break", timeout=15).cookies


class AgentClients:
    """One ``AgentClient`` per host of the current inventory, built on first use and kept
    until the host's address or token file changes (``refresh``). Thread-safe."""

    def __init__(self, read_token: Callable[[str], str], *,
                 transport: TransportFactory | None = None,
                 tls: ClientTls | None = None) -> None:
        self._read_token = read_token
        self._transport = transport
        self._tls = tls
        self._clients: dict[str, tuple[tuple[str, str | None], AgentClient]] = {}
        self._specs: dict[str, Host] = {}
        self._lock = threading.Lock()

    def refresh(self, topology: Topology) -> None:
        """Take the hosts of a (new) inventory: clients of changed or gone hosts close."""
        with self._lock:
            self._specs = {h.name: h for h in topology.hosts}
            for name, (key, client) in list(self._clients.items()):
                spec = self._specs.get(name)
                if spec is None or (spec.agent_url or "", spec.agent_token_file) != key:
                    client.close()
                    del self._clients[name]

    def get(self, host: str) -> AgentClient:
        with self._lock:
            spec = self._specs.get(host)
            if spec is None:
                raise AgentError(f"unknown host {host!r}", host=host)
            if not spec.agent_url:
                raise AgentError(f"host {host} has no agent address", host=host)
            key = (spec.agent_url, spec.agent_token_file)
            known = self._clients.get(host)
            if known is not None and known[0] == key:
                return known[1]
            token = self._read_token(spec.agent_token_file) if spec.agent_token_file else None
            client = AgentClient(host, spec.agent_url, token, transport=(
                self._transport(host) if self._transport else None), tls=self._tls)
            self._clients[host] = (key, client)
            return client

    def close(self) -> None:
        with self._lock:
            for _, client in self._clients.values():
                client.close()
            self._clients.clear()
