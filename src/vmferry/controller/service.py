"""The controller's work, free of HTTP: inventory, hosts, VMs and the fabric that serves them."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from vmferry import failpoints
from vmferry.api.agent import GuestRequest, HostReport
from vmferry.api.agent_client import AgentClient, AgentClients, TransportFactory
from vmferry.api.controller import HostOut, TrunkOut, VmCreate, VmOut
from vmferry.controller import events, nat, route_way
from vmferry.controller.auth import Principal, hash_token
from vmferry.drivers.fabric.base import Fabric
from vmferry.drivers.fabric.nat import NatBoundary, NftNat
from vmferry.drivers.fabric.ovs_fabric import OvsFabric
from vmferry.drivers.fabric.router import NetnsRouter, Router
from vmferry.errors import (
    CapacityError,
    ConflictError,
    FabricError,
    InputError,
    NotFoundError,
    VmferryError,
)
from vmferry.http import ClientTls
from vmferry.lab.router import router_namespaces
from vmferry.model.fabric import Endpoint, client_endpoints, desired_trunk_vlans, path_between
from vmferry.model.migration import PHASES, MigrationState, Phase
from vmferry.model.names import check_unique
from vmferry.model.network import mac_for
from vmferry.model.placement import HostState, VmPolicy
from vmferry.model.profile import PortProfile
from vmferry.model.topology import Topology
from vmferry.store.db import Store
from vmferry.store.schema import HostRow, InventoryRow, MacPoolRow, MigrationRow, VmRow
from vmferry.web import read_token_file

log = logging.getLogger(__name__)

HEARTBEAT_FRESH = timedelta(seconds=10)
FABRIC_WORKERS = 8
# The longest a trunk end's read may take: a hung agent or switch delays a reconcile (so a VM
# create or migration) and ``fabric show`` by at most this much; ends are read in parallel.
FABRIC_READ_TIMEOUT_S = 10.0
# VM states in which the VM occupies its host (and so needs its VLAN there).
PLACED_STATES = {"creating", "running", "migrating"}
# Another controller on the same store may replace the inventory: re-read it this often.
INVENTORY_TTL_S = 5.0


class Controller:
    """``agent_transport`` and ``fabric`` replace the real transports to the agents and the
    real fabric driver (unit tests: in-process agents, a fake fabric)."""

    def __init__(self, store: Store, *, agent_transport: TransportFactory | None = None,
                 fabric: Fabric | None = None, agent_tls: ClientTls | None = None,
                 router: Router | None = None) -> None:
        self.store = store
        self._router = router       # the routed racks' routers (route_way); None: the lab's
        self._fixed_router = router is not None
        self._fabric_lock = threading.Lock()
        self._vm_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._fabric: Fabric | None = fabric
        self._fixed_fabric = fabric is not None
        self._fabric_driver_lock = threading.Lock()
        self._agents = AgentClients(read_token_file, transport=agent_transport, tls=agent_tls)
        self._topology: tuple[float, Topology] | None = None
        self._topology_lock = threading.Lock()
        # Trunk ends the last reconcile could not bring in line ("node:port" -> why).
        self.fabric_drift: dict[str, str] = {}
        self.nat: NatBoundary | None = None      # the routers' NAT (controller/nat.py)

    # ---- inventory --------------------------------------------------------------------------

    def topology(self) -> Topology:
        """The site's inventory, cached (re-read after ``INVENTORY_TTL_S`` or a change)."""
        with self._topology_lock:
            cached = self._topology
            if cached is not None and time.monotonic() - cached[0] < INVENTORY_TTL_S:
                return cached[1]
            with self.store.session() as session:
                row = session.get(InventoryRow, 1)
                if row is None:
                    raise NotFoundError("inventory",
                                        "no inventory loaded yet (PUT /v1/inventory)")
                topology = Topology.model_validate(row.topology)
            if cached is None or cached[1] != topology:
                self._agents.refresh(topology)
            self._topology = (time.monotonic(), topology)
            return topology

    def close(self) -> None:
        self._agents.close()

    def set_inventory(self, topology: Topology, actor: Principal) -> None:
        """Load or replace the site's topology. Hosts that still hold VMs cannot go."""
        with self.store.session() as session:
            vm_hosts = {vm.host for vm in session.scalars(select(VmRow))}
            new_hosts = {h.name for h in topology.hosts}
            gone = sorted(vm_hosts - new_hosts)
            if gone:
                raise ConflictError("hosts", f"hosts {gone} still run VMs")
            tokens: dict[str, str | None] = {}
            for i, host in enumerate(topology.hosts):
                if not host.agent_url:
                    raise InputError(f"topology.hosts[{i}].agent_url", "required")
                tokens[host.name] = hash_token(read_token_file(host.agent_token_file)) \
                    if host.agent_token_file else None
            row = session.get(InventoryRow, 1)
            data = topology.model_dump(mode="json")
            if row is None:
                session.add(InventoryRow(id=1, topology=data))
            else:
                row.topology = data
                row.updated_at = datetime.now(UTC)
            for host_row in session.scalars(select(HostRow)):
                if host_row.name not in new_hosts:
                    session.delete(host_row)
            for host in topology.hosts:
                existing = session.get(HostRow, host.name)
                if existing is None:
                    session.add(HostRow(name=host.name, agent_url=host.agent_url or "",
                                        agent_token_hash=tokens[host.name], report={}))
                else:
                    existing.agent_url = host.agent_url or ""
                    existing.agent_token_hash = tokens[host.name]
        with self._topology_lock:
            self._topology = None
        with self._fabric_lock, self._fabric_driver_lock:
            if self._fabric is not None and not self._fixed_fabric:
                self._fabric.close()
                self._fabric = None
            if not self._fixed_router:
                self._router = None
        events.record(self.store, actor.name, "inventory.set", topology.name, "ok",
                      hosts=sorted(new_hosts))

    def router_driver(self) -> Router:
        if self._router is None:
            self._router = NetnsRouter(router_namespaces(self.topology()))
        return self._router

    def nat_driver(self) -> NatBoundary:
        """The routed racks' routers' NAT translations (the "nat" way across a boundary)."""
        if self.nat is None:
            self.nat = NftNat(self.topology())
        return self.nat

    def fabric_driver(self) -> Fabric:
        with self._fabric_driver_lock:
            if self._fabric is None:
                self._fabric = OvsFabric(self.topology())
            return self._fabric

    # ---- hosts and agents -------------------------------------------------------------------

    def heartbeat(self, host: str, report: HostReport) -> None:
        with self.store.session() as session:
            row = session.get(HostRow, host)
            if row is None:
                raise NotFoundError("host", f"unknown host {host!r}")
            row.last_heartbeat = datetime.now(UTC)
            row.report = report.model_dump(mode="json")

    def hosts(self) -> list[HostOut]:
        topology = self.topology()
        now = datetime.now(UTC)
        with self.store.session() as session:
            vms = list(session.scalars(select(VmRow)))
            result = []
            for host in topology.hosts:
                row = session.get(HostRow, host.name)
                report = row.report if row else {}
                beat = _aware(row.last_heartbeat) if row else None
                result.append(HostOut(
                    name=host.name, rack=host.rack, agent_url=row.agent_url if row else "",
                    agent_alive=bool(beat and now - beat < HEARTBEAT_FRESH),
                    last_heartbeat=beat.isoformat() if beat else None,
                    memory_mib=host.memory_mib, memory_used_mib=report.get("memory_used_mib"),
                    qemu_version=report.get("qemu_version"),
                    vms=sorted(v.name for v in vms if v.host == host.name),
                    maintenance=bool(row and row.maintenance)))
            return result

    def host_report(self, host: str) -> HostReport | None:
        """The host's last heartbeat report (None: none yet)."""
        with self.store.session() as session:
            row = session.get(HostRow, host)
            if row is None:
                raise NotFoundError("host", f"unknown host {host!r}")
            return HostReport.model_validate(row.report) if row.report else None

    def agent(self, host: str) -> AgentClient:
        """The (kept) client of ``host``'s agent. Raises ``NotFoundError``, ``AgentError``."""
        self.topology().host(host)
        return self._agents.get(host)

    # ---- VMs --------------------------------------------------------------------------------

    def vm_lock(self, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._vm_locks.setdefault(name, threading.Lock())

    def create_vm(self, body: VmCreate, actor: Principal,
                  profile: PortProfile | None = None) -> VmOut:
        """Validate, allocate a MAC, carry the VLAN to the host, start the guest.

        On any failure nothing is left: no row, no port, no VLAN on a trunk."""
        topology = self.topology()
        if body.host not in {h.name for h in topology.hosts}:
            raise NotFoundError("host", f"unknown host {body.host!r}")
        vlan = profile.fabric_vlans[0] if profile is not None else body.vlan
        if vlan is None:
            raise InputError("vlan", "give a VLAN or a profile")
        self._check_vlan_and_ip(topology, vlan, body.ip)
        from vmferry.controller.placement import refuse_create  # placement imports this module
        policy = refuse_create(self, body, vlan, profile)
        lock = self.vm_lock(body.name)
        if not lock.acquire(blocking=False):
            raise ConflictError("name", f"VM {body.name!r} is being changed right now")
        try:
            with self.store.session() as session:
                if session.get(VmRow, body.name) is not None:
                    raise ConflictError("name", f"a VM named {body.name!r} exists")
                check_unique(body.name, session.scalars(select(VmRow.name)))
                self._check_memory(session, body.host, body.memory_mib)
                mac = self._allocate_mac(session)
                session.add(VmRow(name=body.name, host=body.host, memory_mib=body.memory_mib,
                                  vlan=vlan, ip=body.ip, mac=mac, profile=body.profile,
                                  workload_mibps=body.workload_mibps,
                                  memcheck_mib=body.memcheck_mib,
                                  max_downtime_ms=policy.max_downtime_ms, state="creating",
                                  policy=policy.model_dump(mode="json")))
            try:
                self.reconcile_fabric(self.vm_path(body.host, vlan))
                request = GuestRequest(name=body.name, memory_mib=body.memory_mib, mac=mac,
                                       ip=body.ip, gateway=body.gateway, vlan=vlan,
                                       workload_mibps=body.workload_mibps, profile=profile,
                                       memcheck_mib=body.memcheck_mib,
                                       hotplug_ports=self.topology().guest_hotplug)
                self.agent(body.host).create_guest(request)
            except VmferryError as exc:
                self._forget_vm(body.name)
                events.record(self.store, actor.name, "vm.create", body.name, "failed",
                              error=exc.message, host=body.host)
                raise
            with self.store.session() as session:
                row = session.get(VmRow, body.name)
                assert row is not None
                row.state = "running"
            events.record(self.store, actor.name, "vm.create", body.name, "ok", host=body.host,
                          vlan=vlan, mac=mac)
            return self.vm(body.name)
        finally:
            lock.release()

    def _forget_vm(self, name: str) -> None:
        """Undo a half-made VM: its guest, row, and the VLAN it pulled onto trunks."""
        with self.store.session() as session:
            row = session.get(VmRow, name)
            host = row.host if row else None
            if row is not None:
                session.delete(row)
        if host:
            try:
                self.agent(host).delete_guest(name)
            except VmferryError as exc:
                log.warning("cleanup of %s on %s failed: %s", name, host, exc)
        try:
            self.reconcile_fabric(())      # best effort: what fails is recorded as drift
        except VmferryError as exc:
            log.warning("fabric reconcile after failed create failed: %s", exc)

    def delete_vm(self, name: str, actor: Principal) -> None:
        lock = self.vm_lock(name)
        if not lock.acquire(blocking=False):
            raise ConflictError("name", f"VM {name!r} is being changed right now")
        try:
            with self.store.session() as session:
                row = session.get(VmRow, name)
                if row is None:
                    raise NotFoundError("name", f"no VM named {name!r}")
                if row.state == "migrating":
                    raise ConflictError("name", f"VM {name!r} is migrating")
                host = row.host
                row.state = "deleting"
            self.agent(host).delete_guest(name)
            with self.store.session() as session:
                row = session.get(VmRow, name)
                if row is not None:
                    session.delete(row)
            self.reconcile_fabric(())          # the VM is gone: drift is recorded, not raised
            try:
                route_way.reconcile(self)      # a VM deleted while routed leaves no /32
            except VmferryError as exc:
                log.warning("routers after deleting %s: %s", name, exc.message)
            events.record(self.store, actor.name, "vm.delete", name, "ok", host=host)
        finally:
            lock.release()

    def vm(self, name: str, *, runtime: bool = False) -> VmOut:
        with self.store.session() as session:
            row = session.get(VmRow, name)
            if row is None:
                raise NotFoundError("name", f"no VM named {name!r}")
            out = _vm_out(row)
        if runtime:
            try:
                out.runtime = self.agent(out.host).guest(name, timeout=10)
            except VmferryError as exc:
                out.runtime_error = exc.message
        return out

    def vms(self) -> list[VmOut]:
        with self.store.session() as session:
            return [_vm_out(r) for r in session.scalars(select(VmRow).order_by(VmRow.name))]

    def _check_vlan_and_ip(self, topology: Topology, vlan: int, ip: str) -> None:
        declared = {v.id for v in topology.vlans}
        if declared and vlan not in declared:
            raise InputError("vlan", f"VLAN {vlan} is not declared in the inventory "
                             f"(declared: {sorted(declared)})")
        subnet = topology.vlan_subnet(vlan)
        if subnet and ipaddress.ip_interface(ip).ip not in ipaddress.ip_network(subnet):
            raise InputError("ip", f"{ip} is outside VLAN {vlan}'s subnet {subnet}")
        with self.store.session() as session:
            address = str(ipaddress.ip_interface(ip).ip)
            for other in session.scalars(select(VmRow).where(VmRow.vlan == vlan)):
                if str(ipaddress.ip_interface(other.ip).ip) == address:
                    raise ConflictError("ip", f"{address} is already used by VM {other.name}")
        for client in topology.clients:
            if client.vlan == vlan and str(ipaddress.ip_interface(client.ip).ip) == \
                    str(ipaddress.ip_interface(ip).ip):
                raise ConflictError("ip", f"{ip} is used by {client.name}")

    def _check_memory(self, session: Any, host: str, memory_mib: int) -> None:
        spec = self.topology().host(host)
        free = spec.memory_mib - memory_used(session, host)
        if memory_mib > free:
            raise CapacityError(f"memory_mib: host {host} has {free} MiB free, "
                                f"{memory_mib} MiB requested", field="memory_mib", host=host,
                                reason="beyond the host's free memory")

    def _allocate_mac(self, session: Any) -> str:
        # One UPDATE bumps the pool before anything reads it: that takes SQLite's write lock
        # (or PostgreSQL's row lock) first, so two VMs created at once never share an index.
        # The pool row is seeded by the store's schema migration 0002.
        bump = (update(MacPoolRow).where(MacPoolRow.id == 1)
                .values(next_index=MacPoolRow.next_index + 1).returning(MacPoolRow.next_index))
        used = {v.mac for v in session.scalars(select(VmRow))}
        while True:
            index = session.execute(bump).scalar_one_or_none()
            if index is None:
                raise ConflictError("mac", "the MAC pool is missing; run the store's schema "
                                    "migrations (vmferry controller does at start)")
            mac = mac_for(index - 1, prefix="52:54:00")
            if mac not in used:
                return mac

    # ---- fabric -----------------------------------------------------------------------------

    def endpoints(self) -> list[Endpoint]:
        """Where every VLAN has endpoints now, read from the store (so a restarted controller
        sees the same): VMs on their hosts, a running migration's destination once its VLAN
        was extended there, and the clients on their access ports."""
        topology = self.topology()
        with self.store.session() as session:
            vms = {v.name: v for v in session.scalars(select(VmRow))}
            away = nat.leases(session)    # moved by NAT or by route: the rack's VLAN there
            result = [Endpoint(node=v.host, owner=v.name, vlan=(
                nat.vlan_at(topology, away[v.name], v.vlan, v.host) if v.name in away
                else route_way.placed_vlan(topology, session, v)))
                      for v in vms.values() if v.state in PLACED_STATES]
            for m in session.scalars(select(MigrationRow).where(
                    MigrationRow.state == MigrationState.RUNNING.value)):
                vm = vms.get(m.vm)
                if vm is not None and PHASES.index(Phase(m.phase)) >= \
                        PHASES.index(Phase.EXTEND_VLAN):
                    result.append(Endpoint(node=m.destination, owner=m.vm, vlan=(
                        nat.vlan_at(topology, away[m.vm], vm.vlan, m.destination)
                        if m.vm in away else route_way.attachment_vlan(
                            topology, vm.vlan, vm.ip, m.destination,
                            route_way.migration_way(m)))))
        result.extend(client_endpoints(topology))
        return result

    def reconcile_fabric(self, path: Collection[str] | None = None) -> dict[str, list[int]]:
        """Make every trunk carry exactly the VLANs with endpoints on both of its sides.

        Every trunk end is read back and only the ends that differ are written, in parallel.
        Best effort: every end is tried, and one that fails is recorded as drift
        (``fabric_drift``; ``fabric show`` reports the end). Only a failed end on ``path`` (the
        nodes of the VM operation at hand) raises ``FabricError``: one dead host or switch does
        not fail every create and migration of the site. No ``path`` (a site-wide reconcile,
        e.g. after a host failed): nothing raises; the drift is recorded and shown.

        A fenced host's ends are not tried (its agent is known gone): they are recorded as
        pending and put right when the host returns and is cleaned."""
        topology = self.topology()
        with self._fabric_lock:
            desired = desired_trunk_vlans(topology, self.endpoints())
            ends = [(node, port, desired[trunk.key]) for trunk in topology.trunks()
                    for node, port in ((trunk.a, trunk.a_port), (trunk.b, trunk.b_port))]
            hosts = {h.name for h in topology.hosts}
            gone = self.hosts_out_of_service()
            failed: dict[tuple[str, str], str] = {
                (node, port): f"pending: {gone[node][1]}" for node, port, _ in ends
                if gone.get(node, ("", ""))[0] == HostState.FENCED}
            with ThreadPoolExecutor(max_workers=FABRIC_WORKERS) as pool:
                futures = {(node, port): pool.submit(self._sync_trunk_end, node, port, vlans,
                                                     node in hosts)
                           for node, port, vlans in ends if (node, port) not in failed}
                for end, future in futures.items():
                    try:
                        future.result()
                    except VmferryError as exc:
                        failed[end] = exc.message
            self.fabric_drift = {f"{node}:{port}": message
                                 for (node, port), message in failed.items()}
        if failed:
            log.warning("fabric reconcile: %d trunk end(s) not reconciled: %s", len(failed),
                        self.fabric_drift)
        blocking = sorted(end for end in failed if path is not None and end[0] in path)
        if blocking:
            raise FabricError("trunk ends not reconciled: " + "; ".join(
                f"{node}:{port}: {failed[(node, port)]}" for node, port in blocking),
                host=blocking[0][0])
        return {k: sorted(v) for k, v in desired.items()}

    def vm_path(self, host: str, vlan: int) -> set[str]:
        """The nodes a VM on ``host`` needs for its VLAN: its host and the switches towards
        the VLAN's other endpoints (other hosts are theirs: a dead one fails only its VMs)."""
        topology = self.topology()
        hosts = {h.name for h in topology.hosts}
        nodes = {host}
        for endpoint in self.endpoints():
            if endpoint.vlan == vlan and endpoint.node != host:
                nodes.update(n for n in path_between(topology, host, endpoint.node)
                             if n not in hosts)
        return nodes

    def _sync_trunk_end(self, node: str, port: str, vlans: frozenset[int],
                        is_host: bool) -> None:
        if is_host:
            agent = self.agent(node)
            if set(agent.uplink_vlans(timeout=FABRIC_READ_TIMEOUT_S)) != vlans:
                agent.set_uplink_vlans(sorted(vlans))
            return
        fabric = self.fabric_driver()
        if fabric.trunk_vlans(node, port) != vlans:
            fabric.set_trunk_vlans(node, port, vlans)
            failpoints.reached("inside:fabric-reconcile")   # this end written, others maybe not

    def hosts_out_of_service(self) -> dict[str, tuple[str, str]]:
        """Hosts the host watch holds as failed: their state (suspected, fenced, cleaning)
        and a sentence saying so."""
        with self.store.session() as session:
            return {row.name: (row.failure_state, f"host {row.name} is {row.failure_state} "
                               f"(no heartbeat since {_aware(row.last_heartbeat) or 'ever'})")
                    for row in session.scalars(select(HostRow).where(
                        HostRow.failure_state.is_not(None))) if row.failure_state}

    def fabric_state(self) -> list[TrunkOut]:
        """Each trunk with the VLANs it should carry and those each end carries, read in
        parallel (each read bounded by ``FABRIC_READ_TIMEOUT_S``). An end that cannot be read
        is reported unreachable with the reason; a fenced host's softswitch is not asked."""
        topology = self.topology()
        desired = desired_trunk_vlans(topology, self.endpoints())
        host_names = {h.name for h in topology.hosts}
        gone = self.hosts_out_of_service()
        drift = dict(self.fabric_drift)
        ends = {(node, port) for trunk in topology.trunks()
                for node, port in ((trunk.a, trunk.a_port), (trunk.b, trunk.b_port))}
        with ThreadPoolExecutor(max_workers=FABRIC_WORKERS) as pool:
            reads = {end: pool.submit(self._read_trunk_end, end[0], end[1],
                                      end[0] in host_names, gone.get(end[0]))
                     for end in sorted(ends)}
            read = {end: future.result() for end, future in reads.items()}
        result = []
        for trunk in topology.trunks():
            want = sorted(desired[trunk.key])
            (actual_a, why_a), (actual_b, why_b) = (read[(trunk.a, trunk.a_port)],
                                                    read[(trunk.b, trunk.b_port)])
            in_sync = actual_a == want and actual_b == want
            if actual_a is not None and actual_a != want:
                why_a = drift.get(f"{trunk.a}:{trunk.a_port}", why_a)
            if actual_b is not None and actual_b != want:
                why_b = drift.get(f"{trunk.b}:{trunk.b_port}", why_b)
            result.append(TrunkOut(
                a=trunk.a, a_port=trunk.a_port, b=trunk.b, b_port=trunk.b_port, desired=want,
                actual_a=actual_a, actual_b=actual_b, in_sync=in_sync,
                a_reachable=actual_a is not None, b_reachable=actual_b is not None,
                a_reason=why_a, b_reason=why_b,
                error="; ".join(f"{node}:{port}: {why}" for node, port, why in (
                    (trunk.a, trunk.a_port, why_a), (trunk.b, trunk.b_port, why_b)) if why)
                or None))
        return result

    def _read_trunk_end(self, node: str, port: str, is_host: bool,
                        failure: tuple[str, str] | None) -> tuple[list[int] | None, str | None]:
        """The VLANs a trunk end carries, or None and why it cannot be read."""
        out_of_service = failure[1] if failure else None
        if failure is not None and failure[0] == HostState.FENCED:
            return None, f"softswitch of {node} unreachable: {out_of_service}; not asked"
        try:
            if is_host:
                return sorted(self.agent(node).uplink_vlans(timeout=FABRIC_READ_TIMEOUT_S)), None
            return sorted(self.fabric_driver().trunk_vlans(node, port)), None
        except VmferryError as exc:
            why = f"softswitch of {node} unreachable: {exc.message}" if is_host else \
                f"switch {node} unreachable: {exc.message}"
            return None, f"{why} ({out_of_service})" if out_of_service else why


def memory_used(session: Any, host: str, *, except_migration: int | None = None) -> int:
    """Memory the VMs on ``host`` take, counting the VMs migrating in (their destination QEMU
    takes the memory from the start of the move)."""
    used: int = sum(v.memory_mib for v in session.scalars(
        select(VmRow).where(VmRow.host == host)))
    for m in session.scalars(select(MigrationRow).where(
            MigrationRow.destination == host, MigrationRow.state.in_(
                [MigrationState.RUNNING.value, MigrationState.ROLLING_BACK.value]))):
        vm = session.get(VmRow, m.vm)
        if m.id != except_migration and vm is not None and vm.host != host:
            used += vm.memory_mib
    return used


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _vm_out(row: VmRow) -> VmOut:
    return VmOut(name=row.name, host=row.host, memory_mib=row.memory_mib, vlan=row.vlan,
                 ip=row.ip, mac=row.mac, profile=row.profile, workload_mibps=row.workload_mibps,
                 max_downtime_ms=row.max_downtime_ms, state=row.state,
                 policy=VmPolicy.model_validate(row.policy) if row.policy else None,
                 created_at=(_aware(row.created_at) or datetime.now(UTC)).isoformat())


__all__ = ["Controller", "Path"]
