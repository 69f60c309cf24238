"""Host failure: an agent that stops heartbeating is suspected, then fenced, then its VMs
restart elsewhere from shared storage by tier; a host that comes back is cleaned of everything
it ran before it may take VMs again.

    up --(no heartbeat for SUSPECT_AFTER_S)--> suspected --(heartbeat)--> up
    suspected --(no heartbeat for FENCE_AFTER_S, fence succeeded)--> fenced -> VMs restarted
    fenced --(heartbeat again)--> cleaning --(its guests removed)--> up
    cleaning --(cleaning failed, heartbeat)--> cleaning again (it takes no VMs until up)

A VM never runs twice: its VMs restart only after the fence succeeded (a failed fence leaves
the host suspected and is tried again). What the host ran when it was fenced is kept in the
store (``HostRow.fenced_vms``) in the same write that marks it fenced: a controller restarted
at any point after that restarts the VMs still placed on the fenced host and cleans every one of
them off the host when it returns. The lab's fence cuts the host's links and kills its
QEMUs (``LabFence``, through ``vmferry.privileged``); a site plugs in a command
(``CommandFence``: ``VMFERRY_FENCE_COMMAND``, ``{host}`` replaced); with neither, hosts are
suspected but never fenced, and their VMs wait.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import threading
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import select

from vmferry import privileged
from vmferry.api.agent import GuestRequest
from vmferry.controller import events
from vmferry.controller.placement import snapshot
from vmferry.controller.profiles import Profiles, stored_profile
from vmferry.controller.service import PLACED_STATES, Controller
from vmferry.errors import HostUnavailableError, PrivilegedError, VmferryError
from vmferry.lab.names import LabLayout
from vmferry.model.placement import HostState
from vmferry.model.placement_plans import plan_restart
from vmferry.model.topology import HOST_UPLINK_PORT, MIGRATION_IFNAME
from vmferry.store.schema import HostRow, VmRow

log = logging.getLogger(__name__)

SUSPECT_AFTER_S = 6.0
FENCE_AFTER_S = 12.0
WATCH_INTERVAL_S = 1.0
ACTOR = "hostwatch"


class Fence(Protocol):
    def fence(self, host: str) -> None:
        """Make sure nothing of ``host`` runs or reaches the network; raise if unsure."""


class LabFence:
    """The lab's fence: the host's uplink and migration links go down, its QEMUs are killed."""

    def __init__(self, lab: str) -> None:
        self.layout = LabLayout(lab)

    def fence(self, host: str) -> None:
        namespace = self.layout.namespace(host)
        for ifname in (HOST_UPLINK_PORT, MIGRATION_IFNAME):
            if privileged.link_exists(namespace, ifname):
                privileged.set_link_up(namespace, ifname, False)
        for pidfile in sorted(self.layout.guest_run_dir(host).glob("*.pid")):
            pid = privileged.read_pidfile(pidfile)
            if pid and privileged.pid_alive(pid) and privileged.is_qemu(pid):
                privileged.stop_pid(pid)
                if privileged.pid_alive(pid):
                    raise PrivilegedError(f"QEMU {pid} of {host} survived the fence",
                                          host=host)


class CommandFence:
    """A site's fence: a command (IPMI, PDU, ...) that exits 0 once the host is off."""

    def __init__(self, command: str) -> None:
        self.argv = shlex.split(command)

    def fence(self, host: str) -> None:
        argv = [a.replace("{host}", host) for a in self.argv]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PrivilegedError(f"fence command for {host} failed: {exc}", host=host) from exc
        if done.returncode != 0:
            raise PrivilegedError(f"fence command for {host} exited {done.returncode}",
                                  host=host, cause=done.stderr[-500:])



class HostWatch:
    """Watches heartbeats in a thread and carries hosts through the states above."""

    def __init__(self, controller: Controller, fence: Fence | None) -> None:
        self.controller = controller
        self.store = controller.store
        self.fence = fence
        self.profiles = Profiles(controller)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # When the running watch started: no heartbeat could arrive while the controller was
        # down or starting, so a host's silence counts from then at the earliest (else every
        # host of a controller restarted after 12 s would be fenced). None: from the beat.
        self._watching_since: datetime | None = None

    def start(self) -> None:
        self._watching_since = datetime.now(UTC)
        self._thread = threading.Thread(target=self._loop, name="hostwatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                self.check()
            except VmferryError as exc:
                log.warning("host watch: %s", exc.message)
            except Exception:  # the watch must go on
                log.exception("host watch failed")

    def check(self) -> None:
        """One pass over every host."""
        now = datetime.now(UTC)
        topology = self.controller.topology()
        for spec in topology.hosts:
            with self.store.session() as session:
                row = session.get(HostRow, spec.name)
                if row is None:
                    continue
                beat = row.last_heartbeat
                if beat is not None and beat.tzinfo is None:
                    beat = beat.replace(tzinfo=UTC)
                age = (now - beat).total_seconds() if beat else None
                state = row.failure_state
            if age is None or beat is None:
                continue            # never heard of: not started yet, nothing runs there
            since = max(beat, self._watching_since or beat)
            silent = (now - since).total_seconds()
            if state is None and silent > SUSPECT_AFTER_S:
                self._set(spec.name, HostState.SUSPECTED, age=round(age, 1))
            elif state == HostState.SUSPECTED and age <= SUSPECT_AFTER_S:
                self._set(spec.name, None, age=round(age, 1))
            elif state == HostState.SUSPECTED and silent > FENCE_AFTER_S:
                self._fence_and_restart(spec.name)
            elif state == HostState.FENCED and age > SUSPECT_AFTER_S:
                self._restart_remaining(spec.name)  # e.g. a controller restarted midway
            elif state in (HostState.FENCED, HostState.CLEANING) and age <= SUSPECT_AFTER_S:
                self._clean(spec.name)      # a cleaning cut short is taken up again

    def _set(self, host: str, state: HostState | None, *, fenced_vms: list[str] | None = None,
             **detail: object) -> None:
        """Record ``host``'s state; ``fenced_vms`` replaces the VMs kept as the host's."""
        with self.store.session() as session:
            row = session.get(HostRow, host)
            if row is not None:
                row.failure_state = state.value if state else None
                row.failure_at = datetime.now(UTC)
                if fenced_vms is not None:
                    row.fenced_vms = fenced_vms
        events.record(self.store, ACTOR, "host.state", host, state.value if state else "up",
                      **detail)

    def _fence_and_restart(self, host: str) -> None:
        if self.fence is None:
            return                  # no fence: the VMs must wait (they might still run)
        try:
            self.fence.fence(host)
        except VmferryError as exc:
            events.record(self.store, ACTOR, "host.fence", host, "failed", error=exc.message)
            return
        ran = sorted(snapshot(self.controller).on_host.get(host, set()))
        with self.store.session() as session:   # a fence tried again keeps the first list
            row = session.get(HostRow, host)
            kept = set(row.fenced_vms or ()) if row is not None else set()
        self._set(host, HostState.FENCED, fenced_vms=sorted(kept | set(ran)), vms=ran)
        self._restart_remaining(host)

    def _restart_remaining(self, host: str) -> None:
        """Restart elsewhere, by tier, the VMs still placed on the fenced ``host``; first finish
        the restarts a stopped controller left half done (moved in the store, ``creating``)."""
        with self.store.session() as session:
            row = session.get(HostRow, host)
            ran = list(row.fenced_vms or ()) if row is not None else []
            unfinished = [(v.name, v.host) for v in session.scalars(select(VmRow).where(
                VmRow.name.in_(ran), VmRow.host != host, VmRow.state == "creating"))]
            remaining = session.scalars(select(VmRow.name).where(
                VmRow.host == host, VmRow.state.in_(PLACED_STATES))).first()
        for vm, destination in unfinished:
            self._restart(vm, host, destination)
        if remaining is None:
            return
        cluster = snapshot(self.controller)
        cluster.hosts[host].state = HostState.FENCED
        plan = plan_restart(cluster, host)
        for move in plan.moves:
            self._restart(move.vm, host, move.destination)
        for vm in plan.stuck:
            self._mark(vm, "stranded")
            events.record(self.store, ACTOR, "vm.restart", vm, "stranded", host=host)
        self._reconcile()

    def _restart(self, vm: str, failed: str, destination: str) -> None:
        """Start ``vm`` on ``destination`` with its MAC, address, VLAN and profile."""
        with self.store.session() as session:
            row = session.get(VmRow, vm)
            if row is None or row.host not in (failed, destination):
                return
            if row.host == destination and row.state != "creating":
                return              # restarted already
            request = GuestRequest(name=vm, memory_mib=row.memory_mib, mac=row.mac, ip=row.ip,
                                   vlan=row.vlan, workload_mibps=row.workload_mibps,
                                   memcheck_mib=row.memcheck_mib,
                                   hotplug_ports=self.controller.topology().guest_hotplug,
                                   profile=stored_profile(self.store, row.profile))
            row.host, row.state = destination, "creating"
        try:
            self._reconcile()
            self.controller.agent(destination).create_guest(request)
        except VmferryError as exc:
            self._mark(vm, "stranded")
            events.record(self.store, ACTOR, "vm.restart", vm, "failed", host=destination,
                          error=exc.message)
            return
        self._mark(vm, "running")
        if request.profile is not None:
            self.profiles.record_created(vm, destination, request.profile)
        events.record(self.store, ACTOR, "vm.restart", vm, "ok", source=failed,
                      host=destination)

    def _reconcile(self) -> None:
        """Carry the VLANs where the VMs are now. The fenced host's own uplink does not answer:
        every other trunk end is still written (they are independent); the fenced host's is
        put right when it returns and is cleaned."""
        try:
            self.controller.reconcile_fabric()
        except HostUnavailableError as exc:
            log.info("fabric reconciled except on %s", exc.fields.get("host"))

    def _mark(self, vm: str, state: str) -> None:
        with self.store.session() as session:
            row = session.get(VmRow, vm)
            if row is not None:
                row.state = state

    def _clean(self, host: str) -> None:
        """The host is back: remove every guest it ran before (they run elsewhere now)."""
        self._set(host, HostState.CLEANING)
        agent = self.controller.agent(host)
        with self.store.session() as session:
            ours = {v.name for v in session.scalars(select(VmRow).where(VmRow.host == host))}
        with self.store.session() as session:
            row = session.get(HostRow, host)
            ran = set(row.fenced_vms or ()) if row is not None else set()
        names = {g.name for g in agent.report().guests} | ran
        for name in sorted(names - ours):
            agent.delete_guest(name)
        self.controller.reconcile_fabric()
        self._set(host, None, fenced_vms=[], cleaned=sorted(names - ours))


def from_environment(controller: Controller) -> HostWatch | None:
    """The watch, when ``VMFERRY_HOSTWATCH=1``: fenced by ``VMFERRY_FENCE_COMMAND`` if set,
    else (for a lab inventory) by the lab's fence."""
    if os.environ.get("VMFERRY_HOSTWATCH") != "1":
        return None
    command = os.environ.get("VMFERRY_FENCE_COMMAND")
    fence: Fence | None = CommandFence(command) if command else None
    if fence is None:
        try:
            topology = controller.topology()
        except VmferryError:
            topology = None
        if topology is None or topology.kind == "lab":
            fence = _LazyLabFence(controller)
    return HostWatch(controller, fence)


class _LazyLabFence:
    """The lab's fence for whichever lab the inventory (loaded later) names."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def fence(self, host: str) -> None:
        topology = self.controller.topology()
        if topology.kind != "lab":
            raise PrivilegedError("no fence for a site: set VMFERRY_FENCE_COMMAND", host=host)
        LabFence(topology.name).fence(host)


__all__ = ["FENCE_AFTER_S", "CommandFence", "HostWatch", "LabFence", "from_environment"]
