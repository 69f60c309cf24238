"""What a host agent does, free of HTTP: guests, their ports, the uplink trunk."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vmferry import privileged
from vmferry.agent import switchover
from vmferry.agent.conntrack import CarrySweeper, from_wire, to_wire
from vmferry.agent.cpuload import CpuLoad
from vmferry.api.agent import (
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
    PortOutcome,
    PortStatus,
    Realization,
)
from vmferry.drivers.hypervisor.base import (
    GuestNic,
    GuestSpec,
    GuestState,
    Hypervisor,
    MigrationTuning,
)
from vmferry.drivers.softswitch.base import OWNER_KEY, PortSpec, Softswitch
from vmferry.drivers.softswitch.ovs import conntrack as carry
from vmferry.drivers.softswitch.ovs import profile as port_profile
from vmferry.errors import (
    CapacityError,
    ConflictError,
    NotFoundError,
    VmferryError,
)
from vmferry.model.fabric import carried_vlans, trunk_column
from vmferry.model.migration import DEFAULT_MAX_DOWNTIME_MS
from vmferry.model.names import TAP_PREFIX, aux_tap_name, tap_name
from vmferry.model.profile import PortProfile
from vmferry.model.topology import HOST_BRIDGE, HOST_UPLINK_PORT

log = logging.getLogger(__name__)

OWNER = "vmferry"
VM_KEY = "vmferry-vm"
AUX_KEY = "vmferry-second-nic"     # the port of a guest's second NIC (a move by dual NIC)
MIGRATION_PORT_BASE = 49152
MAX_EVENTS_WAIT_S = 30.0


class Links(Protocol):
    """The host's network devices the agent makes (taps): ``vmferry.privileged`` in
    production, an in-memory double in unit tests that run without root."""

    def create_tap(self, namespace: str | None, ifname: str, mtu: int = 1500) -> None: ...

    def delete_link(self, namespace: str | None, ifname: str) -> None: ...

    def list_links(self, namespace: str | None) -> list[str]: ...


@dataclass
class AgentConfig:
    host: str
    run_dir: Path
    memory_mib: int
    shared_storage: Path | None
    migration_ip: str | None      # address on the migration network, without prefix
    # The migration network (CIDR): outgoing streams may only go to another address in it.
    migration_network: str | None = None


class HostAgent:
    """Owns one host. Every operation is idempotent and leaves nothing half-done on error."""

    def __init__(self, config: AgentConfig, hypervisor: Hypervisor, softswitch: Softswitch,
                 links: Links | None = None) -> None:
        self.config = config
        self.hypervisor = hypervisor
        self.cpu_load = CpuLoad(hypervisor)
        self.softswitch = softswitch
        self.links: Links = links or privileged
        self._lock = threading.RLock()
        # Memory and requests of guests we started, for capacity and reports.
        self._guests: dict[str, GuestRequest] = {}
        self._incoming: dict[str, str] = {}
        self._sweeper = CarrySweeper(softswitch, HOST_BRIDGE)
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        self._load_requests()

    # ---- guests -----------------------------------------------------------------------------

    def create_guest(self, request: GuestRequest) -> GuestInfo:
        """Plug the guest's port and start it (waiting for a stream when ``incoming``)."""
        with self._lock:
            state = self.hypervisor.state(request.name)
            if state is not GuestState.ABSENT:
                known = self._guests.get(request.name)
                if known is not None and known.mac != request.mac:
                    raise ConflictError("name", f"a different guest {request.name!r} runs here")
                return self.guest(request.name)
            placed = self._guests.get(request.name)
            free = self.config.memory_mib - self.memory_used_mib() + \
                (placed.memory_mib if placed else 0)
            if request.memory_mib > free:
                raise CapacityError(
                    f"host {self.config.host} has {free} MiB free, guest needs "
                    f"{request.memory_mib} MiB", host=self.config.host, field="memory_mib")
            tap = tap_name(request.name)
            started = time.monotonic()
            try:
                self.links.create_tap(None, tap)
                self.softswitch.ensure_port(HOST_BRIDGE, self._port_spec(request))
                self._realize_profile(request)
                self._plug_aux_port(request.name, request.aux_nic)
                plugged = time.monotonic()
                incoming_uri = self._incoming_uri(request.name) if request.incoming else None
                spec = GuestSpec(name=request.name, memory_mib=request.memory_mib,
                                 mac=request.mac, tap=tap, ip_cidr=request.ip,
                                 gateway=request.gateway, workload_mibps=request.workload_mibps,
                                 memcheck_mib=request.memcheck_mib, nic_slot=request.nic_slot,
                                 hotplug_ports=request.hotplug_ports,
                                 aux_nic=_guest_nic(request.name, request.aux_nic))
                self._guests[request.name] = request
                self._save_request(request)
                tuning = MigrationTuning(postcopy=request.postcopy,
                                         tls_peer_name=request.migration_peer) \
                    if incoming_uri else None
                self.hypervisor.start(spec, incoming_uri=incoming_uri, tuning=tuning)
                if incoming_uri:
                    self._incoming[request.name] = incoming_uri
            except VmferryError:
                self._remove_guest(request.name)
                raise
            info = self.guest(request.name)
            log.info("guest %s created in %.0f ms (port %.0f ms)", request.name,
                     (time.monotonic() - started) * 1000, (plugged - started) * 1000)
            return info

    def preset_port(self, request: GuestRequest) -> GuestInfo:
        """Make the guest's tap and switch port exist before the guest does (a migration's
        destination), so frames for it have somewhere to go from the first moment."""
        with self._lock:
            tap = tap_name(request.name)
            try:
                self.links.create_tap(None, tap)
                self.softswitch.ensure_port(HOST_BRIDGE, self._port_spec(request))
                self._realize_profile(request)
                self._plug_aux_port(request.name, request.aux_nic)
            except VmferryError:
                if self.hypervisor.state(request.name) is GuestState.ABSENT:
                    self._remove_guest(request.name)
                raise
            self._guests.setdefault(request.name, request)
            self._save_request(request)
            return self.guest(request.name)

    def delete_guest(self, name: str) -> None:
        """Stop the guest and remove its port, flows, meters and tap (idempotent)."""
        with self._lock:
            self._remove_guest(name)

    def _remove_guest(self, name: str) -> None:
        self.hypervisor.stop(name)
        port_profile.remove(self.softswitch, HOST_BRIDGE, tap_name(name))
        self._sweeper.forget(tap_name(name))
        carry.remove(self.softswitch, HOST_BRIDGE, tap_name(name))
        self.softswitch.delete_port(HOST_BRIDGE, tap_name(name))
        self.links.delete_link(None, tap_name(name))
        self._unplug_aux_port(name)
        self._guests.pop(name, None)
        self._incoming.pop(name, None)
        self._request_file(name).unlink(missing_ok=True)

    # ---- a second NIC (a move by "dual" NIC, controller/dual_nic.py) ------------------

    def plug_nic(self, name: str, nic: AuxNic) -> GuestInfo:
        """Give the running guest a second NIC: its tap and port (on ``nic.vlan``), then
        the hot-plug. Safe to repeat; raises ConflictError when another second NIC is
        there, HypervisorError."""
        with self._lock:
            self._require(name)
            request = self._guests.get(name)
            if request is None:
                raise NotFoundError("vm", f"no guest {name!r} on host {self.config.host}")
            if request.aux_nic is not None and request.aux_nic != nic:
                raise ConflictError("aux_nic", f"{name} has a second NIC "
                                    f"{request.aux_nic.mac} already")
            if nic.slot == request.nic_slot:
                raise ConflictError("slot", f"slot {nic.slot} holds {name}'s NIC")
            self._plug_aux_port(name, nic)
            self.hypervisor.plug_nic(name, GuestNic(mac=nic.mac, tap=aux_tap_name(name),
                                                    slot=nic.slot))
            self._remember(request.model_copy(update={"aux_nic": nic}))
            return self.guest(name)

    def unplug_nic(self, name: str) -> GuestInfo:
        """Remove the guest's second NIC: the hot-unplug (waiting for the guest to let it
        go), then its port and tap (idempotent)."""
        with self._lock:
            request = self._guests.get(name)
            if request is not None and request.aux_nic is not None:
                if self.hypervisor.state(name) is not GuestState.ABSENT:
                    self.hypervisor.unplug_nic(name, request.aux_nic.slot)
                self._remember(request.model_copy(update={"aux_nic": None}))
            self._unplug_aux_port(name)
            return self.guest(name)

    def _plug_aux_port(self, name: str, nic: AuxNic | None) -> None:
        if nic is None:
            return
        self.links.create_tap(None, aux_tap_name(name))
        self.softswitch.ensure_port(HOST_BRIDGE, PortSpec(
            name=aux_tap_name(name), tag=nic.vlan, vlan_mode="access",
            external_ids={OWNER_KEY: OWNER, VM_KEY: name, "attached-mac": nic.mac,
                          AUX_KEY: "true"}))

    def _unplug_aux_port(self, name: str) -> None:
        self.softswitch.delete_port(HOST_BRIDGE, aux_tap_name(name))
        self.links.delete_link(None, aux_tap_name(name))

    def _remember(self, request: GuestRequest) -> None:
        self._guests[request.name] = request
        self._save_request(request)

    def guest(self, name: str, ports: Collection[str] | None = None) -> GuestInfo:
        """``ports``: the bridge's ports when the caller read them already."""
        state = self.hypervisor.state(name)
        if state is GuestState.ABSENT and name not in self._guests:
            raise NotFoundError("vm", f"no guest {name!r} on host {self.config.host}")
        if ports is None:
            ports = self.softswitch.ports(HOST_BRIDGE)
        request = self._guests.get(name)
        return GuestInfo(name=name, state=state.value, tap=tap_name(name),
                         port_present=tap_name(name) in ports,
                         incoming_uri=self._incoming.get(name),
                         memory_mib=request.memory_mib if request else None)

    def guests(self) -> list[GuestInfo]:
        names = set(self.hypervisor.guests()) | set(self._guests)
        # One read of the bridge for all (a report, on every heartbeat and precheck, listed
        # the switch's ports once per guest).
        ports = set(self.softswitch.ports(HOST_BRIDGE))
        return [self.guest(n, ports) for n in sorted(names)]

    def memory_used_mib(self) -> int:
        """Memory of every guest placed here, including a preset destination's."""
        return sum(r.memory_mib for r in self._guests.values())

    def _port_spec(self, request: GuestRequest) -> PortSpec:
        return PortSpec(name=tap_name(request.name), tag=request.vlan, vlan_mode="access",
                        external_ids={OWNER_KEY: OWNER, VM_KEY: request.name,
                                      "attached-mac": request.mac})

    # ---- port profiles (the OVS driver's profile pipeline does the work) --------------

    def _realize_profile(self, request: GuestRequest) -> None:
        if request.profile is not None:
            port_profile.realize(self.softswitch, HOST_BRIDGE, tap_name(request.name),
                                 request.mac, [request.ip], request.profile)

    def set_port_profile(self, name: str, profile: PortProfile | None) -> Realization:
        """Realize ``profile`` on the guest's port live (None: remove it); remembered."""
        with self._lock:
            request = self._guests.get(name)
            if request is None:
                raise NotFoundError("vm", f"no guest {name!r} on host {self.config.host}")
            updated = request.model_copy(update={"profile": profile, "vlan": (
                profile.fabric_vlans[0] if profile is not None else request.vlan)})
            port = tap_name(name)
            if profile is None:
                result = Realization(port=port, removed=port_profile.remove(
                    self.softswitch, HOST_BRIDGE, port))
            else:
                result = Realization.model_validate(port_profile.realize(
                    self.softswitch, HOST_BRIDGE, port, request.mac, [request.ip],
                    profile).to_dict())
            self._guests[name] = updated
            self._save_request(updated)
            return result

    def set_port_profiles(self, names: list[str], profile: PortProfile) -> list[PortOutcome]:
        """Realize ``profile`` live on many guests' ports together (one OVSDB transaction, one
        flow bundle); remembered for each guest it reached. One outcome per name, in order:
        the realization report with ``ok`` true, or ``ok`` false and the ``error``; a port
        the batch fails on is retried alone so only it fails. Raises ``InputError`` for a bad
        profile (then nothing is touched)."""
        parsed = profile
        with self._lock:
            outcomes: dict[str, PortOutcome] = {}
            known = []
            for name in dict.fromkeys(names):
                request = self._guests.get(name)
                if request is None:
                    outcomes[name] = PortOutcome(
                        vm=name, ok=False, error=f"no guest {name!r} on host {self.config.host}")
                else:
                    known.append(request)
            results = port_profile.realize_each(self.softswitch, HOST_BRIDGE, [
                port_profile.PortRequest(tap_name(r.name), r.mac, (r.ip,), parsed)
                for r in known])
            for request, result in zip(known, results, strict=True):
                if isinstance(result, VmferryError):
                    cause = result.fields.get("cause")
                    outcomes[request.name] = PortOutcome(vm=request.name, ok=False, error=(
                        f"{result.message}: {cause}" if cause else result.message))
                    continue
                updated = request.model_copy(update={"profile": profile,
                                                     "vlan": parsed.fabric_vlans[0]})
                self._guests[request.name] = updated
                self._save_request(updated)
                outcomes[request.name] = PortOutcome(vm=request.name, ok=True,
                                                     **result.to_dict())
            return [outcomes[name] for name in names]

    def port_status(self, name: str) -> PortStatus:
        """The guest port's desired and actual state, and whether they match."""
        request = self._guests.get(name)
        if request is None:
            raise NotFoundError("vm", f"no guest {name!r} on host {self.config.host}")
        return PortStatus.model_validate(port_profile.port_status(
            self.softswitch, HOST_BRIDGE, tap_name(name), request.mac, [request.ip],
            request.profile))

    # ---- connection tracking that follows a guest (vmferry.agent.conntrack) -------------------

    def conntrack(self, name: str) -> ConnState:
        """The tracked connections of the guest's port (none without a stateful profile)."""
        if name not in self._guests:
            raise NotFoundError("vm", f"no guest {name!r} on host {self.config.host}")
        entries = carry.read(self.softswitch, HOST_BRIDGE, tap_name(name))
        return ConnState(entries=[to_wire(e) for e in entries])

    def carry_conntrack(self, name: str, state: ConnState) -> ConnCarried:
        """Make the guest's port treat ``state``'s connections as established from their
        first packet (temporary carry flows, swept once committed or expired)."""
        with self._lock:
            request = self._guests.get(name)
            if request is None:
                raise NotFoundError("vm", f"no guest {name!r} on host {self.config.host}")
            port = tap_name(name)
            flows = carry.install(self.softswitch, HOST_BRIDGE, port, request.mac,
                                  [request.ip], [from_wire(e) for e in state.entries])
            if flows:
                self._sweeper.watch(port)
            return ConnCarried(flows=flows)

    def drop_carried_conntrack(self, name: str) -> None:
        """Remove the guest port's carry flows (idempotent)."""
        self._sweeper.forget(tap_name(name))
        carry.remove(self.softswitch, HOST_BRIDGE, tap_name(name))

    # ---- migration --------------------------------------------------------------------------

    def _incoming_uri(self, name: str) -> str:
        if not self.config.migration_ip:
            raise ConflictError("host", f"host {self.config.host} has no migration network")
        return f"tcp:{self.config.migration_ip}:{_free_port(self.config.migration_ip)}"

    def migrate(self, name: str, request: MigrateRequest) -> None:
        self._require(name)
        options = request.options
        tuning: dict[str, Any] = dict(
            max_downtime_ms=options.max_downtime_ms or DEFAULT_MAX_DOWNTIME_MS,
            bandwidth_mbps=options.bandwidth_mbps,
            postcopy=options.postcopy_allowed, auto_converge=options.auto_converge,
            tls_peer_name=request.peer)
        if request.pause_before_switchover:
            # MigrationTuning gains the field with contract H1 (b-hypervisor).
            tuning["pause_before_switchover"] = True
        self.hypervisor.migrate(name, request.uri, MigrationTuning(**tuning))

    def migration_progress(self, name: str) -> MigrationProgress:
        self._require(name)
        progress = self.hypervisor.migration_progress(name)
        return MigrationProgress.model_validate(
            {**progress.__dict__, "extra": {k: v for k, v in progress.extra.items()
                                            if isinstance(v, int | float | str | list)}})

    def continue_migration(self, name: str) -> None:
        """Let a migration paused in "pre-switchover" finish (make-before-break)."""
        self._require(name)
        self.hypervisor.continue_migration(name)

    def events(self, name: str, after: int, wait: float) -> list[GuestEvent]:
        """The guest's QMP events after ``after``, waiting up to ``wait`` s for one."""
        found = self.hypervisor.events(
            name, after=after, timeout=max(0.0, min(wait, MAX_EVENTS_WAIT_S)))
        return [GuestEvent(seq=e.seq, kind=e.kind, status=e.status, timestamp=e.timestamp)
                for e in found]

    def start_postcopy(self, name: str) -> None:
        self._require(name)
        self.hypervisor.start_postcopy(name)

    def cancel_migration(self, name: str) -> None:
        self._require(name)
        self.hypervisor.cancel_migration(name)

    def pause_migration(self, name: str) -> None:
        """Break a postcopy's hung stream: this end goes to postcopy-paused."""
        self._require(name)
        self.hypervisor.pause_migration(name)

    def recover_incoming(self, name: str) -> str:
        """On the destination of a paused postcopy: listen again (a fresh port) for the
        source to resume it. Returns the URI."""
        self._require(name)
        uri = self._incoming_uri(name)
        self.hypervisor.recover_incoming(name, uri)
        return uri

    def resume_migration(self, name: str, uri: str) -> None:
        """On the source of a paused postcopy: reconnect to ``uri`` and go on."""
        self._require(name)
        self.hypervisor.resume_migration(name, uri)

    def memcheck(self, name: str) -> MemcheckVerdict:
        """The guest's memory-check verdict from its console on this host."""
        self._require(name)
        return memcheck_verdict(self.hypervisor.console(name))

    def resume(self, name: str) -> None:
        self._require(name)
        self.hypervisor.resume(name)

    def announce(self, name: str) -> None:
        self._require(name)
        self.hypervisor.announce(name)

    def _require(self, name: str) -> None:
        if self.hypervisor.state(name) is GuestState.ABSENT:
            raise NotFoundError("vm", f"no guest {name!r} on host {self.config.host}")

    # ---- uplink -----------------------------------------------------------------------------

    def uplink_vlans(self) -> list[int]:
        port = self.softswitch.ports(HOST_BRIDGE).get(HOST_UPLINK_PORT)
        return sorted(carried_vlans(port.trunks)) if port else []

    def set_uplink_vlans(self, vlans: list[int]) -> list[int]:
        self.softswitch.set_trunks(HOST_BRIDGE, HOST_UPLINK_PORT, trunk_column(frozenset(vlans)))
        return self.uplink_vlans()

    # ---- audit ------------------------------------------------------------------------------

    def inventory_of_leftovers(self) -> HostLeftovers:
        """Everything vmferry put on this host, by the VM it belongs to, as found on it now:
        QEMU processes, switch ports it tagged, taps it named, saved guest requests, carried
        conntrack flows no sweep will remove."""
        ports = self.softswitch.ports(HOST_BRIDGE)
        cookies = set(carry.carry_cookies(self.softswitch, HOST_BRIDGE))
        carried = sorted(p.external_ids.get(VM_KEY, name) for name, p in ports.items()
                         if carry.carry_cookie(name) in cookies
                         and not self._sweeper.watching(name))
        return HostLeftovers(carried=carried,
            guests=sorted(self.hypervisor.guests()),
            ports=sorted(p.external_ids.get(VM_KEY, name) for name, p in ports.items()
                         if p.external_ids.get(OWNER_KEY) == OWNER),
            taps=sorted(link for link in self.links.list_links(None)
                        if link.startswith(TAP_PREFIX)),
            requests=sorted(self._guests))

    def delete_stray_tap(self, name: str) -> None:
        """Remove a vmferry tap that no guest of this host uses (idempotent)."""
        if not name.startswith(TAP_PREFIX):
            raise ConflictError("name", f"{name} is not a vmferry tap")
        if name in {tap_name(g) for g in self._guests}:
            raise ConflictError("name", f"{name} belongs to a guest of this host")
        self.softswitch.delete_port(HOST_BRIDGE, name)
        self.links.delete_link(None, name)

    # ---- make-before-break switchover (vmferry.agent.switchover does the rules) -----------

    def open_switchover(self, name: str, cookie: int, vlan: int, mac: str) -> int:
        """Deliver frames for ``mac`` on ``vlan`` from the uplink straight to the guest's tap
        (a temporary rule with ``cookie``) while the guest migrates here; returns the number of
        rules. Raises ``InputError`` (not a switchover cookie), ``NotFoundError`` (no port)."""
        return switchover.install_host_rules(self.softswitch, HOST_BRIDGE, HOST_UPLINK_PORT,
                                             tap_name(name), cookie, vlan, mac)

    def close_switchover(self, cookie: int) -> None:
        """Remove the temporary rules with ``cookie`` (idempotent)."""
        switchover.remove_host_rules(self.softswitch, HOST_BRIDGE, cookie)

    def switchover_cookies(self) -> list[int]:
        """Cookies of the temporary switchover rules present on this host."""
        return switchover.host_rule_cookies(self.softswitch, HOST_BRIDGE)

    # ---- report -----------------------------------------------------------------------------

    def report(self) -> HostReport:
        storage = self.config.shared_storage
        guests = self.guests()
        loads = self.cpu_load.sample(g.name for g in guests if g.state != GuestState.ABSENT.value)
        return HostReport(
            host=self.config.host, qemu_version=self.hypervisor.version(),
            machine_types=self.hypervisor.machine_types(), memory_mib=self.config.memory_mib,
            memory_used_mib=self.memory_used_mib(),
            guests=[g.model_copy(update={"cpu_load": loads.get(g.name)}) for g in guests],
            shared_storage=str(storage) if storage else None,
            shared_storage_ok=bool(storage and storage.is_dir() and os.access(storage, os.W_OK)),
            migration_ip=self.config.migration_ip, cpus=os.cpu_count())

    # ---- persistence of guest requests (so a restarted agent knows its guests) ---------------

    def _request_file(self, name: str) -> Path:
        return self.config.run_dir / f"{name}.request.json"

    def _save_request(self, request: GuestRequest) -> None:
        self._request_file(request.name).write_text(request.model_dump_json())

    def _load_requests(self) -> None:
        for path in self.config.run_dir.glob("*.request.json"):
            try:
                request = GuestRequest.model_validate_json(path.read_text())
            except ValueError:
                continue
            self._guests[request.name] = request


def _guest_nic(name: str, nic: AuxNic | None) -> GuestNic | None:
    return None if nic is None else GuestNic(mac=nic.mac, tap=aux_tap_name(name), slot=nic.slot)


def _free_port(address: str) -> int:
    """A TCP port free on ``address`` for QEMU's incoming migration listener."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


_MEMCHECK_PASS = re.compile(r"VMFERRY-MEMCHECK pass=(\d+) blocks=\d+ failures=(\d+)")


def memcheck_verdict(console: str | None) -> MemcheckVerdict:
    """What image/init.sh's memory check printed on ``console``."""
    if console is None:
        return MemcheckVerdict(available=False)
    passes = _MEMCHECK_PASS.findall(console)
    fails = [line.strip() for line in console.splitlines() if "VMFERRY-MEMCHECK-FAIL" in line]
    return MemcheckVerdict(available=True, passes=len(passes),
                           last_pass=int(passes[-1][0]) if passes else None,
                           failures=max(int(passes[-1][1]) if passes else 0, len(fails)),
                           fail_lines=fails[:20])
