"""The ways of moving the guest that the benchmark compares (OVN, the peer, is ``ovn.py``):

    floor    QEMU live migration with the destination network wired by hand beforehand (VLAN on
             the trunks towards the destination, destination port preset), driven directly
             through the agents; then the source cleaned and the VLAN pruned by hand.
    vmferry  ``POST /v1/migrations`` on the controller (what ``vmferry migrate`` does).
    naive    the destination's tap exists but its switch port and the VLAN on the trunks are
             wired only after switchover, then the guest announces itself.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from datetime import datetime
from typing import Any

from vmferry.bench.migration.config import (
    ACTIVE_QEMU_STATES,
    HAND_POLL_S,
    BenchConfig,
    Timing,
)
from vmferry.bench.migration.lab import BenchLab, cpu_ms
from vmferry.errors import AgentError, ConflictError, MigrationError, VmferryError, WaitTimeout
from vmferry.model.addresses import bare, free_address
from vmferry.model.names import tap_name
from vmferry.model.topology import HOST_BRIDGE


class Variant(ABC):
    """One way of moving the guest. ``prepare`` places it on ``home``; ``migrate`` moves it;
    ``finish`` removes it. Each must leave the lab as it found it."""

    name: str = ""
    description: str = ""

    def __init__(self, lab: BenchLab, config: BenchConfig, address: str) -> None:
        self.lab = lab
        self.config = config
        self.ip = address
        self.vm = f"bench-{self.name}"

    @property
    def address(self) -> str:
        return self.ip.split("/")[0]

    @property
    def probe_namespace(self) -> str:
        """Where the probe runs: the configured client (a peer may bring its own)."""
        return self.lab.namespace(self.config.client)

    @abstractmethod
    def prepare(self, home: str) -> None: ...

    def restore(self, where: str) -> None:
        """Before a run, outside the measured window: the guest's VLAN reaches its host again.
        Variants run interleaved, and another variant's pruning (by hand, or the controller's
        reconciliation, which knows only its own VMs) may have taken it off a trunk."""
        self.lab.wire_vlan(self.config.vlan, [where])

    def addresses(self, destination: str) -> tuple[str, str]:
        """(where the guest answers before the move to ``destination``, where after): one
        address, but for a move that changes it (dual NIC)."""
        return self.address, self.address

    def published_address(self) -> str:
        """Where the guest answers now, as its mover says."""
        return self.address

    @abstractmethod
    def migrate(self, source: str, destination: str) -> Timing: ...

    @abstractmethod
    def finish(self, host: str) -> None: ...


class _HandDriven(Variant):
    """Shared by the floor and the naive order: a guest the controller does not know, started
    and moved through the agents directly, its network wired through the fabric driver."""

    # One MAC per variant (floor ...:01, naive ...:03, OVN ...:04): the variants' guests run
    # side by side, and two of them sharing one MAC made the fabric's learning flap between
    # their hosts during every run (counted as MAC moves, probes delivered to the wrong guest).
    mac = "52:54:00:be:00:01"

    def __init__(self, lab: BenchLab, config: BenchConfig, address: str) -> None:
        super().__init__(lab, config, address)
        self.last_events: dict[str, float] = {}    # QMP timestamps of the last migration

    def clean_and_prune(self, source: str, destination: str, started: float,
                        marks: dict[str, float], qemu: dict[str, Any]) -> Timing:
        """The hand-driven ending: remove the source guest, prune the VLAN, time it all."""
        self.lab.agent(source, "DELETE", f"/v1/guests/{self.vm}")
        marks["clean_source"] = time.monotonic()
        self.lab.wire_vlan(self.config.vlan, [destination], before=[source, destination])
        marks["prune_vlan"] = time.monotonic()
        return Timing(total_ms=(time.monotonic() - started) * 1000, qemu=qemu,
                      phases=_phase_durations(started, marks), events=self.last_events)

    def request(self, *, incoming: bool, peer: str | None = None) -> dict[str, Any]:
        """The guest as the agent takes it; ``peer``: the source host an incoming stream
        may come from (the lab runs QEMU's migration over TLS, authorized by host name)."""
        body: dict[str, Any] = {
            "name": self.vm, "memory_mib": self.config.memory_mib, "mac": self.mac,
            "ip": self.ip, "vlan": self.config.vlan,
            "workload_mibps": self.config.workload_mibps, "incoming": incoming}
        if peer is not None:
            body["migration_peer"] = peer
        return body

    def prepare(self, home: str) -> None:
        self.lab.wire_vlan(self.config.vlan, [home])
        self.lab.agent(home, "PUT", f"/v1/guests/{self.vm}", body=self.request(incoming=False))

    def finish(self, host: str) -> None:
        try:
            self.lab.agent(host, "DELETE", f"/v1/guests/{self.vm}")
        finally:
            # Every trunk end that could carry the VLAN for the guest is checked.
            self.lab.wire_vlan(self.config.vlan, [], before=[h.name
                                                             for h in self.lab.topology.hosts])

    def start_destination(self, source: str, destination: str) -> str:
        try:
            info = self.lab.agent(destination, "PUT", f"/v1/guests/{self.vm}",
                                  body=self.request(incoming=True, peer=source))
        except AgentError as exc:
            # Seen on a loaded machine: the agent's first QMP connection to a QEMU it just
            # started fails. Outside the measured window's figures (the total time keeps it):
            # remove that guest and start it once more.
            if "QMP connection" not in exc.message:
                raise
            self.lab.agent(destination, "DELETE", f"/v1/guests/{self.vm}")
            info = self.lab.agent(destination, "PUT", f"/v1/guests/{self.vm}",
                                  body=self.request(incoming=True, peer=source))
        uri = info.get("incoming_uri")
        if not uri:
            raise MigrationError(f"destination QEMU on {destination} is not waiting for the "
                                 f"stream (state {info.get('state')})", vm=self.vm)
        return str(uri)

    def run_qemu_migration(self, source: str, destination: str, uri: str) -> dict[str, Any]:
        """Start the QEMU migration on the source and wait, polling often, until it ends;
        returns QEMU's final report. Raises ``MigrationError`` or ``WaitTimeout``."""
        self.lab.agent(source, "POST", f"/v1/guests/{self.vm}/migrate",
                       body={"uri": uri, "peer": destination, "options": {
                           "max_downtime_ms": self.config.max_downtime_ms,
                           "auto_converge": True, "postcopy": "never"}})
        deadline = time.monotonic() + self.config.migration_timeout_s
        while time.monotonic() < deadline:
            progress: dict[str, Any] = self.lab.agent(source, "GET",
                                                      f"/v1/guests/{self.vm}/migration")
            status = progress.get("status")
            if status == "completed":
                self._ensure_running(destination)
                self.last_events = qmp_events(self.lab, self.vm, source, destination)
                return progress
            if status not in ACTIVE_QEMU_STATES:
                raise MigrationError(f"QEMU migration {status}: {progress.get('error')}",
                                     vm=self.vm)
            time.sleep(HAND_POLL_S)
        self.lab.agent(source, "POST", f"/v1/guests/{self.vm}/migration/cancel")
        raise WaitTimeout(f"the QEMU migration of {self.vm} to complete",
                          self.config.migration_timeout_s)

    def _ensure_running(self, destination: str, timeout: float = 20.0) -> None:
        """The source reports ``completed`` a little before the destination has loaded the
        last state and runs: wait for it (resuming it if it stays paused). Raises
        ``WaitTimeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.lab.agent(destination, "GET", f"/v1/guests/{self.vm}").get("state")
            if state == "running":
                return
            if state == "paused":
                self.lab.agent(destination, "POST", f"/v1/guests/{self.vm}/resume")
            time.sleep(HAND_POLL_S)
        raise WaitTimeout(f"{self.vm} to run on {destination}", timeout)


class Floor(_HandDriven):
    name = "floor"
    description = ("QEMU migration, destination wired by hand beforehand (VLAN on trunks, port "
                   "preset), driven through the agents; source cleaned and VLAN pruned after")

    def migrate(self, source: str, destination: str) -> Timing:
        marks: dict[str, float] = {}
        started = time.monotonic()
        self.lab.wire_vlan(self.config.vlan, [source, destination], before=[source])
        self.lab.agent(destination, "PUT", f"/v1/ports/{self.vm}",
                       body=self.request(incoming=True, peer=source))
        marks["wire"] = time.monotonic()
        uri = self.start_destination(source, destination)
        marks["start_destination"] = time.monotonic()
        qemu = self.run_qemu_migration(source, destination, uri)
        marks["qemu_migration"] = time.monotonic()
        return self.clean_and_prune(source, destination, started, marks, qemu)


class Naive(_HandDriven):
    name = "naive"
    mac = "52:54:00:be:00:03"
    description = ("destination QEMU's tap exists but its switch port and the VLAN on the "
                   "trunks are wired only after switchover; then announce, clean, prune")

    def migrate(self, source: str, destination: str) -> Timing:
        marks: dict[str, float] = {}
        started = time.monotonic()
        uri = self.start_destination(source, destination)
        # The agent plugs the port as it starts a guest: unplug it so only the tap is there.
        switch = self.lab.host_softswitch(destination)
        try:
            switch.delete_port(HOST_BRIDGE, tap_name(self.vm))
        finally:
            switch.close()
        marks["start_destination"] = time.monotonic()
        qemu = self.run_qemu_migration(source, destination, uri)
        marks["qemu_migration"] = time.monotonic()
        self.lab.wire_vlan(self.config.vlan, [source, destination], before=[source])
        self.lab.agent(destination, "PUT", f"/v1/ports/{self.vm}",
                       body=self.request(incoming=False))
        marks["wire"] = time.monotonic()
        self.lab.agent(destination, "POST", f"/v1/guests/{self.vm}/announce")
        marks["announce"] = time.monotonic()
        return self.clean_and_prune(source, destination, started, marks, qemu)


class Vmferry(Variant):
    name = "vmferry"
    description = "vmferry migrate: POST /v1/migrations on the controller, waited on"

    def prepare(self, home: str) -> None:
        self.lab.controller("POST", "/v1/vms", body={
            "name": self.vm, "host": home, "vlan": self.config.vlan, "ip": self.ip,
            "memory_mib": self.config.memory_mib, "workload_mibps": self.config.workload_mibps,
            "max_downtime_ms": self.config.max_downtime_ms})

    def finish(self, host: str) -> None:
        self.lab.controller("DELETE", f"/v1/vms/{self.vm}")

    def addresses(self, destination: str) -> tuple[str, str]:
        """By dual NIC the guest takes an address of the destination rack's pool, the first
        free from the top (``model.addresses.free_address``: the benchmark's guest is the
        only one there), and takes its home address back on the way out; ``measure`` checks
        the address published after the move against this one."""
        if self.config.boundary != "dual":
            return super().addresses(destination)
        published = self.published_address()
        if published != self.address:
            return published, self.address
        topology = self.lab.topology
        rack = next(r for r in topology.racks if r.name == topology.host(destination).rack)
        if rack.subnet is None:
            raise ConflictError("boundary", f"{destination} is not in a routed rack")
        leased = free_address(rack.subnet, rack.gateway, ())
        if leased is None:
            raise ConflictError("boundary", f"no free address in {rack.subnet}")
        return published, bare(leased)

    def published_address(self) -> str:
        """The address the controller publishes for the guest (``vmferry vm show``)."""
        return bare(str(self.lab.controller("GET", f"/v1/vms/{self.vm}")["ip"]))

    def migrate(self, source: str, destination: str) -> Timing:
        pid = self.lab.controller_pid()
        cpu_before = cpu_ms(pid) if pid else None
        started = time.monotonic()
        record: dict[str, Any] = self.lab.controller("POST", "/v1/migrations", body={
            "vm": self.vm, "to": destination, "postcopy": "never",
            "max_downtime_ms": self.config.max_downtime_ms,
            "timeout_s": self.config.migration_timeout_s, "boundary": self.config.boundary})
        deadline = started + self.config.migration_timeout_s + 60
        while record["state"] in ("running", "rolling-back") and time.monotonic() < deadline:
            record = self.lab.controller("GET", f"/v1/migrations/{record['id']}",
                                         params={"wait": 30})
        total_ms = (time.monotonic() - started) * 1000
        cpu_after = cpu_ms(pid) if pid else None
        if record["state"] != "completed":
            raise MigrationError(f"vmferry migrate ended {record['state']}: {record['error']}",
                                 vm=self.vm)
        result = record["result"]
        phases = {p["phase"]: float(p.get("duration_ms") or 0.0) for p in record["phases"]}
        qemu = dict(result.get("qemu") or {})
        events = {k: float(v) for k, v in (result.get("events") or {}).items()
                  if isinstance(v, int | float)}
        if isinstance(result.get("make_before_break_opened_at"), int | float):
            # When the destination's gate was open (the controller's clock: same machine).
            events["gate_open"] = float(result["make_before_break_opened_at"])
        timing = Timing(total_ms=total_ms, qemu=qemu, phases=phases, events=events,
                        switchover_open_ms=result.get("make_before_break_open_ms"))
        if cpu_before is not None and cpu_after is not None:
            timing.controller_cpu_ms = round(cpu_after - cpu_before, 1)
        timing.completed_to_switchover_ms, timing.completed_to_switchover_how = \
            completed_to_switchover(result, record["phases"], qemu)
        return timing


def qmp_events(lab: BenchLab, vm: str, source: str, destination: str) -> dict[str, float]:
    """The QMP timestamps of the migration that just ended, through the agents' event
    endpoint (H4): the source's last STOP and MIGRATION completed, the destination's last
    RESUME. Empty when an agent does not offer the endpoint."""
    found: dict[str, float] = {}
    picks = ((source, "STOP", None, "source_stop"),
             (source, "MIGRATION", "completed", "source_completed"),
             (destination, "RESUME", None, "destination_resume"))
    for host, kind, status, key in picks:
        try:
            events = lab.agent(host, "GET", f"/v1/guests/{vm}/events",
                               params={"after": 0, "wait": 0}) or []
        except VmferryError:
            return {}
        matching = [e for e in events if e.get("kind") == kind
                    and (status is None or e.get("status") == status)]
        if matching:
            found[key] = float(matching[-1]["timestamp"])
    return found


def completed_to_switchover(result: dict[str, Any], phases: list[dict[str, Any]],
                            qemu: dict[str, Any]) -> tuple[float | None, str | None]:
    """From QEMU's ``completed`` to the switchover phase starting, ms: what the engine
    recorded (H5), else derived: the precopy phase's start + QEMU's own total time (the
    migration's start on the source to completed; the migrate command is issued a few ms after
    the phase starts, so this overstates the lag by that much)."""
    if result.get("completed_to_switchover_ms") is not None:
        return float(result["completed_to_switchover_ms"]), "engine"
    starts = {p["phase"]: p.get("started") for p in phases}
    completed = (result.get("events") or {}).get("source_completed")
    switchover = _epoch(starts.get("switchover"))
    if completed is not None and switchover is not None:
        return round((switchover - float(completed)) * 1000, 1), "QMP completed event"
    precopy = _epoch(starts.get("precopy"))
    total = qemu.get("total_time_ms")
    if precopy is None or switchover is None or total is None:
        return None, None
    return round((switchover - precopy) * 1000 - float(total), 1), \
        "derived: precopy start + QEMU total_time_ms"


def _epoch(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _phase_durations(started: float, marks: dict[str, float]) -> dict[str, float]:
    result: dict[str, float] = {}
    previous = started
    for name, moment in marks.items():
        result[name] = round((moment - previous) * 1000, 1)
        previous = moment
    return result
