"""A whole site in memory for unit tests of the migration engine: a real ``Controller`` on a
SQLite store, real ``HostAgent``s (their FastAPI apps reached through ``AgentClient`` over an
in-process transport), and the in-tree fake drivers (``FakeHypervisor`` on one
``FakeNetwork``, ``FakeSoftswitch``, ``FakeFabric``).

Migrations of the fake hypervisors advance only when stepped: the site's pump steps every
running migration every few milliseconds, except those a test holds (``hold``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from vmferry.agent.app import create_app as agent_app
from vmferry.agent.service import AgentConfig, HostAgent
from vmferry.api.controller import MigrationRecord, VmCreate
from vmferry.controller import auth
from vmferry.controller.migration import Migrations
from vmferry.controller.service import Controller
from vmferry.drivers.fabric.fake import FakeFabric, FakeRouter, FakeSwitch
from vmferry.drivers.fabric.nat import FakeNat
from vmferry.drivers.hypervisor.fake import FakeHypervisor, FakeNetwork
from vmferry.drivers.softswitch.base import PortSpec
from vmferry.drivers.softswitch.fake import FakeSoftswitch
from vmferry.errors import VmferryError
from vmferry.model.migration import MigrationOptions
from vmferry.model.switchover import PortInfo
from vmferry.model.topology import (
    HOST_BRIDGE,
    HOST_UPLINK_PORT,
    Topology,
    default_topology_path,
    load_topology,
)
from vmferry.store.db import Store
from vmferry.store.schema import HostRow

PUMP_S = 0.005
# How long closing a site waits for the runs a test left going (cancelled, released).
CLOSE_WAIT_S = 10.0
STEPPING = {"setup", "active", "device", "postcopy-active"}


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

    def __init__(self, tmp: Path, topology: Path | None = None) -> None:
        self.tmp = tmp
        self.store = Store(f"sqlite:///{tmp / 'store.db'}")
        self.store.create_schema()
        base = load_topology(topology or default_topology_path())
        data = base.model_dump(mode="json")
        shared = tmp / "shared"
        shared.mkdir()
        self.network = FakeNetwork()
        self.hypervisors: dict[str, FakeHypervisor] = {}
        self.softswitches: dict[str, FakeSoftswitch] = {}
        self.agents: dict[str, HostAgent] = {}
        self.clients: dict[str, TestClient] = {}
        self.unreachable: set[str] = set()
        # Loopback addresses a migration URI can name (the controller builds the URI from
        # the inventory's migration address; the agent binds its incoming port there).
        data["migration_network"] = "127.0.0.0/24"
        for host in data["hosts"]:
            name = host["name"]
            token_file = tmp / f"{name}.token"
            token_file.write_text(f"token-{name}\n")
            host["agent_url"] = f"http://{name}.agent"
            host["agent_token_file"] = str(token_file)
            self.hypervisors[name] = FakeHypervisor(name, network=self.network,
                                                    auto_step=False)
            switch = self.softswitches[name] = FakeSoftswitch()
            switch.ensure_bridge(HOST_BRIDGE)
            switch.ensure_port(HOST_BRIDGE, PortSpec(name=HOST_UPLINK_PORT, vlan_mode="trunk"))
            self.agents[name] = HostAgent(
                AgentConfig(host=name, run_dir=tmp / "run" / name, memory_mib=4096,
                            shared_storage=shared,
                            migration_ip=f"127.0.0.{len(self.agents) + 1}",
                            migration_network="127.0.0.0/24"),
                self.hypervisors[name], switch, links=FakeLinks())
            self.clients[name] = TestClient(agent_app(self.agents[name], f"token-{name}"),
                                            raise_server_exceptions=False)
        self.topology = Topology.model_validate(data)
        self.fabric = fake_fabric(self.topology)
        self.router = FakeRouter([r.router for r in self.topology.routed_racks()])
        self.nat = FakeNat()
        self.held: dict[tuple[str, str], str] = {}
        self.engines: list[Migrations] = []
        self._stop = threading.Event()
        self._pump = threading.Thread(target=self._step_migrations, daemon=True)
        self._pump.start()
        self.controller, self.migrations = self.new_controller()
        self.controller.set_inventory(self.topology, self.actor())

    def actor(self) -> auth.Principal:
        return auth.Principal(name="test", role=auth.Role.ADMIN)

    def new_controller(self) -> tuple[Controller, Migrations]:
        """A controller (a restarted one, when there was one) on the same store and hosts."""
        controller = Controller(self.store, agent_transport=self.transport, fabric=self.fabric,
                                router=self.router)
        controller.nat = self.nat          # the routers' NAT, in memory like the routers
        migrations = Migrations(controller)
        self.engines.append(migrations)
        return controller, migrations

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

    def _step_migrations(self) -> None:
        """Advance every running migration that no test holds."""
        while not self._stop.wait(PUMP_S):
            for host, hv in self.hypervisors.items():
                for vm in hv.guests():
                    try:
                        status = hv.migration_progress(vm).status
                        if status in STEPPING and self.held.get((host, vm)) != status:
                            hv.step(vm)
                    except VmferryError:
                        continue        # the guest went meanwhile

    def hold(self, host: str, vm: str, at: str = "active") -> None:
        """Keep the migration of ``vm`` from ``host`` at status ``at`` until ``release``."""
        self.held[(host, vm)] = at

    def release(self, host: str, vm: str) -> None:
        self.held.pop((host, vm), None)

    def status(self, host: str, vm: str) -> str:
        return self.hypervisors[host].migration_progress(vm).status

    def create_vm(self, name: str = "vm1", host: str = "host1") -> None:
        self.controller.create_vm(VmCreate(name=name, host=host, vlan=100,
                                           ip="192.0.2.10/24", memory_mib=256), self.actor())

    def migrate(self, vm: str = "vm1", to: str = "host3", **options: Any) -> MigrationRecord:
        return self.migrations.start(vm, to, MigrationOptions.model_validate(options),
                                     self.actor())

    def wait_status(self, host: str, vm: str, status: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.status(host, vm) == status:
                    return
            except VmferryError:
                pass
            time.sleep(0.01)
        raise AssertionError(f"{vm} on {host} never reached {status}")

    def close(self) -> None:
        self._end_runs()
        self._stop.set()
        self._pump.join()
        self.controller.close()
        self.store.dispose()


    def _end_runs(self) -> None:
        """Let every run this site started end (cancelled, hosts back, holds released) and
        wait for it, bounded: a thread left running would act during later tests (it once
        hit another test's monkeypatch of ``Run.progress``)."""
        self.unreachable.clear()
        self.held.clear()
        threads = []
        for engine in self.engines:
            for migration_id, thread in list(engine._threads.items()):
                if thread.is_alive():
                    engine._cancel.setdefault(migration_id, threading.Event()).set()
                    threads.append(thread)
        deadline = time.monotonic() + CLOSE_WAIT_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def site_at(tmp: Path, topology: Path | None = None) -> Iterator[Site]:
    site = Site(tmp, topology)
    try:
        yield site
    finally:
        site.close()


def fake_fabric(topology: Topology) -> FakeFabric:
    """The topology's fabric switches with their trunk and access ports."""
    switches = {s.name: FakeSwitch() for s in topology.switches}
    for trunk in topology.trunks():
        for node, port in ((trunk.a, trunk.a_port), (trunk.b, trunk.b_port)):
            if node in switches:
                ports = switches[node].ports
                ports[port] = PortInfo(len(ports) + 1, trunk_vlans=frozenset())
    for client in topology.clients:
        ports = switches[client.switch].ports
        ports[f"a-{client.name}"] = PortInfo(len(ports) + 1, access_vlan=client.vlan)
    return FakeFabric(switches)


def beat(site: Site, *, silent: str | None = None, age: float = 0) -> None:
    """Every agent reports; ``silent``'s last heartbeat is set ``age`` s in the past."""
    for name, agent in site.agents.items():
        if name != silent:
            site.controller.heartbeat(name, agent.report())
    if silent:
        with site.store.session() as session:
            row = session.get(HostRow, silent)
            assert row is not None
            row.last_heartbeat = datetime.now(UTC) - timedelta(seconds=age)
