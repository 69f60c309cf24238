"""A whole site in memory for unit tests of the migration engine: a real ``Controller`` on a
SQLite store, real ``HostAgent``s (their FastAPI apps reached through ``AgentClient`` over an
in-process transport), and in-memory drivers.

The drivers here follow the interface contracts of this round (H1 hypervisor events and
pause-before-switchover, H2 softswitch, H3 fabric). They stand in until the in-tree fakes
(``vmferry.drivers.*.fake``) land on main; then this module builds the site from those.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from vmferry.agent.app import create_app as agent_app
from vmferry.agent.service import AgentConfig, HostAgent
from vmferry.api.controller import MigrationRecord
from vmferry.controller import auth
from vmferry.controller.migration import Migrations
from vmferry.controller.service import Controller
from vmferry.drivers.fabric.base import Fabric
from vmferry.drivers.hypervisor.base import (
    GuestSpec,
    GuestState,
    Hypervisor,
    MigrationProgress,
    MigrationTuning,
    ProgressCallback,
)
from vmferry.drivers.softswitch.base import Flow, PortSpec
from vmferry.drivers.softswitch.fake import FakeSoftswitch
from vmferry.errors import HypervisorError, NotFoundError
from vmferry.model.topology import (
    HOST_BRIDGE,
    HOST_UPLINK_PORT,
    Topology,
    default_topology_path,
    load_topology,
)
from vmferry.store.db import Store


@dataclass(frozen=True)
class Event:
    """``vmferry.drivers.hypervisor.base.GuestEvent`` (contract H1)."""

    seq: int
    kind: str
    status: str | None
    timestamp: float


@dataclass
class Outgoing:
    """One outgoing migration of a fake guest."""

    destination: FakeHypervisor
    status: str = "setup"
    hold: bool = False               # stay "active" until the test lets go
    pause: bool = False              # stop in "pre-switchover" until continue_migration
    error: str | None = None
    released: threading.Event = field(default_factory=threading.Event)
    continued: threading.Event = field(default_factory=threading.Event)


class Wire:
    """Where incoming migration listeners are (uri -> hypervisor): the fakes' network."""

    def __init__(self) -> None:
        self.listeners: dict[str, tuple[FakeHypervisor, str]] = {}
        self.lock = threading.Lock()


class FakeHypervisor(Hypervisor):
    """Guests as states; a migration runs in a thread: setup, active, (pre-switchover), STOP,
    device, completed on the source; RESUME on the destination. ``hold_migrations`` keeps a
    migration active until ``release``, ``break_link`` fails it, ``crash`` kills a guest."""

    def __init__(self, host: str, wire: Wire) -> None:
        self.host = host
        self.wire = wire
        self.states: dict[str, GuestState] = {}
        self.outgoing: dict[str, Outgoing] = {}
        self.hold_migrations = False
        self._events: dict[str, list[Event]] = {}
        self._seq: dict[str, int] = {}
        self._cond = threading.Condition()

    # ---- events (H1) --------------------------------------------------------------------------

    def emit(self, name: str, kind: str, status: str | None = None) -> None:
        with self._cond:
            seq = self._seq[name] = self._seq.get(name, 0) + 1
            self._events.setdefault(name, []).append(Event(seq, kind, status, time.time()))
            self._cond.notify_all()

    def events(self, name: str, *, after: int = 0, timeout: float = 0.0) -> list[Event]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self._events.get(name, []) if e.seq > after]
                left = deadline - time.monotonic()
                if found or left <= 0:
                    return found
                self._cond.wait(left)

    def continue_migration(self, name: str) -> None:
        out = self.outgoing.get(name)
        if out is None or out.status != "pre-switchover":
            raise HypervisorError(f"{name} is not in pre-switchover")
        out.continued.set()

    # ---- the interface ------------------------------------------------------------------------

    def version(self) -> str:
        return "10.0.2"

    def machine_types(self) -> list[str]:
        return ["q35", "pc-q35-10.0"]

    def start(self, spec: GuestSpec, *, incoming_uri: str | None = None,
              tuning: MigrationTuning | None = None) -> int:
        if self.state(spec.name) is not GuestState.ABSENT:
            return 1
        if incoming_uri:
            self.states[spec.name] = GuestState.INMIGRATE
            with self.wire.lock:
                self.wire.listeners[incoming_uri] = (self, spec.name)
        else:
            self.states[spec.name] = GuestState.RUNNING
            self.emit(spec.name, "RESUME")
        return 1

    def stop(self, name: str) -> None:
        self.states.pop(name, None)
        with self.wire.lock:
            for uri, (hv, guest) in list(self.wire.listeners.items()):
                if hv is self and guest == name:
                    del self.wire.listeners[uri]

    def crash(self, name: str) -> None:
        """The guest's QEMU dies (the agent still knows the guest)."""
        self.stop(name)

    def state(self, name: str) -> GuestState:
        return self.states.get(name, GuestState.ABSENT)

    def guests(self) -> list[str]:
        return sorted(self.states)

    def migrate(self, name: str, uri: str, tuning: MigrationTuning) -> None:
        with self.wire.lock:
            listener = self.wire.listeners.pop(uri, None)
        if listener is None:
            raise HypervisorError(f"nothing listens on {uri}")
        out = Outgoing(destination=listener[0], hold=self.hold_migrations,
                       pause=bool(getattr(tuning, "pause_before_switchover", False)))
        self.outgoing[name] = out
        self.emit(name, "MIGRATION", "setup")
        threading.Thread(target=self._migrate, args=(name, listener[1], out),
                         daemon=True).start()

    def _migrate(self, name: str, remote: str, out: Outgoing) -> None:
        out.status = "active"
        self.emit(name, "MIGRATION", "active")
        if out.hold:
            out.released.wait(60)
        if out.status != "active":
            return                    # failed or cancelled meanwhile
        if out.destination.state(remote) is not GuestState.INMIGRATE:
            self._fail(name, out, "connection reset by peer")
            return
        self.states[name] = GuestState.PAUSED
        self.emit(name, "STOP")
        if out.pause:
            out.status = "pre-switchover"
            self.emit(name, "MIGRATION", "pre-switchover")
            out.continued.wait(60)
        out.status = "device"
        self.emit(name, "MIGRATION", "device")
        out.status = "completed"
        self.states[name] = GuestState.POSTMIGRATE
        self.emit(name, "MIGRATION", "completed")
        time.sleep(0.01)             # the destination resumes a little after
        out.destination.states[remote] = GuestState.RUNNING
        out.destination.emit(remote, "RESUME")

    def _fail(self, name: str, out: Outgoing, error: str) -> None:
        out.status, out.error = "failed", error
        self.states[name] = GuestState.RUNNING
        self.emit(name, "MIGRATION", "failed")

    def break_link(self, name: str) -> None:
        """The migration stream breaks: QEMU reports the migration failed."""
        out = self.outgoing[name]
        self._fail(name, out, "Unable to write to socket: Broken pipe")
        out.released.set()

    def release(self, name: str) -> None:
        self.outgoing[name].released.set()

    def migration_progress(self, name: str) -> MigrationProgress:
        if self.state(name) is GuestState.ABSENT:
            raise NotFoundError("vm", f"no guest {name}")
        out = self.outgoing.get(name)
        if out is None:
            return MigrationProgress(status="none")
        return MigrationProgress(status=out.status, total_bytes=256 << 20,
                                 remaining_bytes=0 if out.status == "completed" else 1 << 20,
                                 mbps=800.0, error=out.error,
                                 downtime_ms=12 if out.status == "completed" else None,
                                 total_time_ms=150 if out.status == "completed" else None)

    def wait_migration(self, name: str, *, timeout: float,
                       on_progress: ProgressCallback | None = None,
                       postcopy_after_s: float | None = None) -> MigrationProgress:
        raise NotImplementedError("the engine follows events, it does not wait")

    def start_postcopy(self, name: str) -> None:
        self.outgoing[name].status = "postcopy-active"

    def cancel_migration(self, name: str) -> None:
        out = self.outgoing.get(name)
        if out is not None and out.status in {"setup", "active"}:
            out.status = "cancelled"
            self.emit(name, "MIGRATION", "cancelled")
            out.released.set()

    def resume(self, name: str) -> None:
        if self.state(name) is GuestState.ABSENT:
            raise HypervisorError(f"no guest {name}")
        self.states[name] = GuestState.RUNNING
        self.emit(name, "RESUME")

    def announce(self, name: str) -> None:
        self.emit(name, "ANNOUNCE")


@dataclass
class SwitchPort:
    ofport: int
    vlan_mode: str | None
    tag: int | None


class FakeFabric(Fabric):
    """The fabric switches of a topology: trunk VLANs per port, flows by cookie."""

    def __init__(self, topology: Topology) -> None:
        self.trunks: dict[tuple[str, str], frozenset[int]] = {}
        self.switch_ports: dict[str, dict[str, SwitchPort]] = {s.name: {} for s in
                                                               topology.switches}
        self.flows: dict[str, dict[int, list[Flow]]] = {s.name: {} for s in topology.switches}
        self.forgotten: list[tuple[str, str]] = []
        for trunk in topology.trunks():
            for node, port in ((trunk.a, trunk.a_port), (trunk.b, trunk.b_port)):
                if node in self.switch_ports:
                    ports = self.switch_ports[node]
                    ports[port] = SwitchPort(len(ports) + 1, "trunk", None)

    def trunk_vlans(self, switch: str, port: str) -> frozenset[int]:
        return self.trunks.get((switch, port), frozenset())

    def set_trunk_vlans(self, switch: str, port: str, vlans: frozenset[int]) -> None:
        self.trunks[(switch, port)] = vlans

    def forget_mac(self, switch: str, mac: str) -> None:
        self.forgotten.append((switch, mac))

    def ports(self, switch: str) -> dict[str, SwitchPort]:
        return dict(self.switch_ports[switch])

    def replace_flows(self, switch: str, cookie: int, flows: list[Flow]) -> None:
        if flows:
            self.flows[switch][cookie] = list(flows)
        else:
            self.flows[switch].pop(cookie, None)

    def flow_cookies(self, switch: str) -> set[int]:
        return set(self.flows[switch])


class FakeLinks:
    """The host's taps, in memory (``HostAgent(links=...)``)."""

    def __init__(self) -> None:
        self.links: set[str] = set()

    def create_tap(self, namespace: str | None, ifname: str, mtu: int = 1500) -> None:
        self.links.add(ifname)

    def delete_link(self, namespace: str | None, ifname: str) -> None:
        self.links.discard(ifname)

    def list_links(self, namespace: str | None) -> list[str]:
        return sorted(self.links)


class Site:
    """The site: controller, migrations, and per host its agent and fake drivers."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = Store(f"sqlite:///{tmp / 'store.db'}")
        self.store.create_schema()
        base = load_topology(default_topology_path())
        data = base.model_dump(mode="json")
        shared = tmp / "shared"
        shared.mkdir()
        self.wire = Wire()
        self.hypervisors: dict[str, FakeHypervisor] = {}
        self.softswitches: dict[str, FakeSoftswitch] = {}
        self.agents: dict[str, HostAgent] = {}
        self.clients: dict[str, TestClient] = {}
        self.unreachable: set[str] = set()
        for host in data["hosts"]:
            name = host["name"]
            token_file = tmp / f"{name}.token"
            token_file.write_text(f"token-{name}\n")
            host["agent_url"] = f"http://{name}.agent"
            host["agent_token_file"] = str(token_file)
            self.hypervisors[name] = FakeHypervisor(name, self.wire)
            switch = self.softswitches[name] = FakeSoftswitch()
            switch.ensure_bridge(HOST_BRIDGE)
            switch.ensure_port(HOST_BRIDGE, PortSpec(name=HOST_UPLINK_PORT, vlan_mode="trunk"))
            self.agents[name] = HostAgent(
                AgentConfig(host=name, run_dir=tmp / "run" / name, memory_mib=4096,
                            shared_storage=shared, migration_ip="127.0.0.1"),
                self.hypervisors[name], switch, links=FakeLinks())
            self.clients[name] = TestClient(agent_app(self.agents[name], f"token-{name}"),
                                            raise_server_exceptions=False)
        self.topology = Topology.model_validate(data)
        self.fabric = FakeFabric(self.topology)
        self.controller, self.migrations = self.new_controller()
        self.controller.set_inventory(self.topology, self.actor())

    def actor(self) -> auth.Principal:
        return auth.Principal(name="test", role=auth.Role.ADMIN)

    def new_controller(self) -> tuple[Controller, Migrations]:
        """A controller (a restarted one, when there was one) on the same store and hosts."""
        controller = Controller(self.store, agent_transport=self.transport, fabric=self.fabric)
        return controller, Migrations(controller)

    def transport(self, host: str) -> httpx.BaseTransport:
        client = self.clients[host]

        def handle(request: httpx.Request) -> httpx.Response:
            if host in self.unreachable:
                raise httpx.ConnectError("connection refused", request=request)
            answer = client.request(request.method, request.url.path,
                                    params=request.url.params, content=request.content,
                                    headers=dict(request.headers))
            return httpx.Response(answer.status_code, headers=answer.headers,
                                  content=answer.content)
        return httpx.MockTransport(handle)

    def create_vm(self, name: str = "vm1", host: str = "host1") -> None:
        from vmferry.api.controller import VmCreate
        self.controller.create_vm(VmCreate(name=name, host=host, vlan=100,
                                           ip="192.0.2.10/24", memory_mib=256), self.actor())

    def migrate(self, vm: str = "vm1", to: str = "host3", **options: Any) -> MigrationRecord:
        from vmferry.model.migration import MigrationOptions
        return self.migrations.start(vm, to, MigrationOptions.model_validate(options),
                                     self.actor())

    def wait_status(self, host: str, vm: str, status: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.hypervisors[host].outgoing.get(vm)
            if out is not None and out.status == status:
                return
            time.sleep(0.01)
        raise AssertionError(f"{vm} on {host} never reached {status}")

    def close(self) -> None:
        self.controller.close()
        self.store.dispose()


def site_at(tmp: Path) -> Iterator[Site]:
    site = Site(tmp)
    try:
        yield site
    finally:
        site.close()
