"""``vmferry bench migration``: how long the network is dark when a VM moves, three ways.

On a lab of its own, the same guest is migrated back and forth between a rack-1 host and a
rack-2 host (every run crosses the spine) under the same probe (ping every 1-2 ms from
``client-100``), by each variant in turn:

    floor    QEMU live migration with the destination network wired by hand beforehand (VLAN on
             the trunks towards the destination, destination port preset), driven directly
             through the agents; then the source cleaned and the VLAN pruned by hand.
    vmferry  ``POST /v1/migrations`` on the controller (what ``vmferry migrate`` does).
    naive    the destination's tap exists but its switch port and the VLAN on the trunks are
             wired only after switchover, then the guest announces itself.

A variant is a ``Variant`` subclass in ``VARIANTS``; a peer (OVN, issue 6) is one more, which
may build what it needs in ``prepare`` and remove it in ``finish``.

Statistics (``summarize``, ``compare``) are pure functions of the runs' numbers.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmferry import paths
from vmferry.agent.service import tap_name
from vmferry.bench.probe import PingProbe, wait_reachable
from vmferry.drivers.fabric.ovs_fabric import OvsFabric
from vmferry.drivers.softswitch.ovs import OvsSoftswitch
from vmferry.errors import (
    AgentError,
    ConflictError,
    MigrationError,
    VmferryError,
    WaitTimeout,
)
from vmferry.http import client_for, error_payload, raise_for_agent
from vmferry.lab.names import LabLayout
from vmferry.lab.ovs_instance import OvsInstance
from vmferry.model.fabric import Endpoint, client_endpoints, desired_trunk_vlans
from vmferry.model.topology import HOST_BRIDGE, Topology, default_topology_path, load_topology

log = logging.getLogger(__name__)

METRICS = ("lost", "blackout_ms", "reply_gap_ms", "qemu_downtime_ms", "total_ms")
ACTIVE_QEMU_STATES = {"setup", "active", "pre-switchover", "device", "postcopy-active",
                      "wait-unplug", "cancelling"}
# The targets for vmferry.
TARGET_BLACKOUT_VS_FLOOR = 1.2
TARGET_BLACKOUT_OVER_DOWNTIME_MS = 20.0
TARGET_BLACKOUT_VS_NAIVE = 0.5          # "far below": at most half
TARGET_TOTAL_OVER_FLOOR_MS = 1000.0
# How often the hand-driven variants ask QEMU whether the migration is done.
HAND_POLL_S = 0.01


# ---- configuration and results ------------------------------------------------------------

@dataclass(frozen=True)
class BenchConfig:
    runs: int = 5
    memory_mib: int = 256
    workload_mibps: int = 0
    interval_ms: float = 2.0
    max_downtime_ms: int = 300
    variants: tuple[str, ...] = ("floor", "vmferry", "naive")
    lab_name: str = "bench"
    controller_port: int = 0            # 0: pick a free one
    topology: Path | None = None
    client: str = "client-100"
    vlan: int = 100
    warmup_s: float = 0.5               # probe runs this long before each migration...
    tail_s: float = 1.0                 # ...and this long after it
    migration_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not 1 <= self.runs <= 100:
            raise ValueError("runs must be between 1 and 100")
        if not 1.0 <= self.interval_ms <= 2.0:
            raise ValueError("the probe interval must be 1-2 ms")
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")


@dataclass
class Timing:
    """What a variant measured about one migration, besides the probe."""

    total_ms: float
    qemu: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class RunResult:
    variant: str
    run: int
    source: str
    destination: str
    ok: bool
    error: str | None = None
    lost: int | None = None
    blackout_ms: float | None = None
    reply_gap_ms: float | None = None
    qemu_downtime_ms: float | None = None
    total_ms: float | None = None
    qemu_total_ms: float | None = None
    probe: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)


# ---- statistics (pure) --------------------------------------------------------------------

def summarize(values: Iterable[float | int | None]) -> dict[str, float | int | None]:
    """Median, min and max of the values that are not None (all None when there are none)."""
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(present), "min": min(present), "max": max(present),
            "n": len(present)}


def summarize_runs(runs: Sequence[RunResult]) -> dict[str, dict[str, float | int | None]]:
    """Per metric, the statistics of the successful runs."""
    ok = [r for r in runs if r.ok]
    return {metric: summarize(getattr(r, metric) for r in ok) for metric in METRICS}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 1)


def compare(results: Mapping[str, Sequence[RunResult]]) -> dict[str, dict[str, Any]]:
    """The figures the issue's targets talk about, each with its target and whether it is met
    (``met`` is None when a figure cannot be computed, e.g. a variant was not run)."""
    medians = {name: {m: s["median"] for m, s in summarize_runs(runs).items()}
               for name, runs in results.items()}
    vmferry = medians.get("vmferry", {})
    floor = medians.get("floor", {})
    naive = medians.get("naive", {})
    over_downtime = [r.blackout_ms - r.qemu_downtime_ms for r in results.get("vmferry", [])
                     if r.ok and r.blackout_ms is not None and r.qemu_downtime_ms is not None]
    figures: dict[str, tuple[float | None, float, str]] = {
        "blackout_vs_floor": (_ratio(vmferry.get("blackout_ms"), floor.get("blackout_ms")),
                              TARGET_BLACKOUT_VS_FLOOR,
                              "vmferry blackout / floor blackout (medians)"),
        "blackout_minus_qemu_downtime_ms": (
            round(statistics.median(over_downtime), 1) if over_downtime else None,
            TARGET_BLACKOUT_OVER_DOWNTIME_MS,
            "vmferry blackout - QEMU downtime, ms (median over runs)"),
        "blackout_vs_naive": (_ratio(vmferry.get("blackout_ms"), naive.get("blackout_ms")),
                              TARGET_BLACKOUT_VS_NAIVE,
                              "vmferry blackout / naive blackout (medians)"),
        "total_minus_floor_ms": (_diff(vmferry.get("total_ms"), floor.get("total_ms")),
                                 TARGET_TOTAL_OVER_FLOOR_MS,
                                 "vmferry total time - floor total time, ms (medians)"),
        # Issue 6: vmferry loses no more packets than the floor, nor than OVN.
        "lost_minus_floor": (_diff(vmferry.get("lost"), floor.get("lost")), 0.0,
                             "vmferry packets lost - floor packets lost (medians)"),
        "lost_minus_ovn": (_diff(vmferry.get("lost"), medians.get("ovn", {}).get("lost")), 0.0,
                           "vmferry packets lost - OVN packets lost (medians)"),
    }
    return {name: {"value": value, "target_max": target, "what": what,
                   "met": None if value is None else value <= target}
            for name, (value, target, what) in figures.items()}


# ---- the lab the benchmark runs on --------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class BenchLab:
    """A lab brought up for the benchmark alone, and the hands that wire it directly: the
    agents' HTTP API, the fabric driver for the switches' trunks, the hosts' OVS databases."""

    def __init__(self, topology: Topology, controller_port: int) -> None:
        self.topology = topology
        self.layout = LabLayout(topology.name)
        self.controller_port = controller_port
        self.inventory: Topology | None = None
        self.admin_token: str | None = None
        self._fabric: OvsFabric | None = None

    # -- life cycle

    def up(self, say: Callable[[str], None]) -> None:
        from vmferry.image.builder import ensure_image
        from vmferry.lab.builder import Lab
        if self.layout.state_file.exists():
            raise ConflictError("lab-name", f"a lab named {self.topology.name!r} already exists "
                                f"under {paths.state_root()}; bring it down or pick another name")
        say("guest image")
        ensure_image()
        lab = Lab(self.topology, controller_port=self.controller_port)
        self.inventory = lab.up(progress=lambda step: say(f"lab: {step}"))
        self.admin_token = self.layout.admin_token_file.read_text().strip()

    def down(self) -> list[str]:
        from vmferry.lab.builder import teardown
        if self._fabric is not None:
            self._fabric.close()
            self._fabric = None
        return teardown(self.topology.name)

    # -- reaching things

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    def _inventory(self) -> Topology:
        if self.inventory is None:
            raise ConflictError("lab", "the bench lab is not up")
        return self.inventory

    def agent(self, host: str, method: str, path: str, *, body: Any = None,
              timeout: float = 120) -> Any:
        """One request to a host's agent. Raises ``AgentError``."""
        import httpx
        spec = self._inventory().host(host)
        token = Path(spec.agent_token_file).read_text().strip() if spec.agent_token_file else None
        try:
            with client_for(spec.agent_url or "", token=token, timeout=timeout) as api:
                response = api.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise AgentError(f"agent on {host} unreachable: {exc}", host=host) from exc
        raise_for_agent(host, response)
        return response.json() if response.content else None

    def controller(self, method: str, path: str, *, body: Any = None,
                   params: dict[str, Any] | None = None, timeout: float = 300) -> Any:
        """One request to the lab's controller with the admin token. Raises ``VmferryError``."""
        import httpx
        try:
            with client_for(self.controller_url, token=self.admin_token,
                            timeout=timeout) as api:
                response = api.request(method, path, json=body, params=params)
        except httpx.HTTPError as exc:
            raise VmferryError(f"controller unreachable: {exc}") from exc
        if not response.is_success:
            payload = error_payload(response)
            raise VmferryError(f"controller: {payload.get('message', response.reason_phrase)}",
                               status=response.status_code)
        return response.json() if response.content else None

    def fabric(self) -> OvsFabric:
        if self._fabric is None:
            self._fabric = OvsFabric(self._inventory())
        return self._fabric

    def host_softswitch(self, host: str) -> OvsSoftswitch:
        ovs = OvsInstance(host, self.layout.namespace(host), self.layout.ovs_dir(host))
        return OvsSoftswitch(f"unix:{ovs.db_socket}")

    def namespace(self, node: str) -> str:
        return self.layout.namespace(node)

    def rack_hosts(self) -> tuple[str, str]:
        """A host of the first rack and a host of another rack: the path crosses the spine."""
        topo = self.topology
        first = topo.racks[0].name
        a = next(h.name for h in topo.hosts if h.rack == first)
        b = next((h.name for h in topo.hosts if h.rack != first), None)
        if b is None:
            raise ConflictError("topology", "the benchmark needs hosts in two racks")
        return a, b

    # -- wiring by hand

    def wire_vlan(self, vlan: int, hosts: Iterable[str], before: Iterable[str] = ()) -> None:
        """Make every trunk carry ``vlan`` exactly when the lab's clients and ``hosts`` put
        endpoints of it on both sides, as an operator would by hand: only the trunk ends whose
        answer differs from when the endpoints were the clients and ``before`` are touched, and
        only ``vlan`` is added or removed there. Raises ``AgentError`` or ``FabricError``."""
        topo = self._inventory()
        clients = client_endpoints(topo)
        after = desired_trunk_vlans(topo, [*clients, *(Endpoint(node=h, vlan=vlan, owner="bench")
                                                        for h in hosts)])
        was = desired_trunk_vlans(topo, [*clients, *(Endpoint(node=h, vlan=vlan, owner="bench")
                                                      for h in before)])
        host_names = {h.name for h in topo.hosts}
        for trunk in topo.trunks():
            want = vlan in after[trunk.key]
            if want == (vlan in was[trunk.key]):
                continue
            for node, port in ((trunk.a, trunk.a_port), (trunk.b, trunk.b_port)):
                if node in host_names:
                    current = set(self.agent(node, "GET", "/v1/uplink")["vlans"])
                    if (vlan in current) != want:
                        new = current | {vlan} if want else current - {vlan}
                        self.agent(node, "PUT", "/v1/uplink", body={"vlans": sorted(new)})
                else:
                    carried = self.fabric().trunk_vlans(node, port)
                    if (vlan in carried) != want:
                        new_set = carried | {vlan} if want else carried - {vlan}
                        self.fabric().set_trunk_vlans(node, port, frozenset(new_set))


# ---- the variants -------------------------------------------------------------------------

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

    @abstractmethod
    def migrate(self, source: str, destination: str) -> Timing: ...

    @abstractmethod
    def finish(self, host: str) -> None: ...


class _HandDriven(Variant):
    """Shared by the floor and the naive order: a guest the controller does not know, started
    and moved through the agents directly, its network wired through the fabric driver."""

    mac = "52:54:00:be:00:01"

    def clean_and_prune(self, source: str, destination: str, started: float,
                        marks: dict[str, float], qemu: dict[str, Any]) -> Timing:
        """The hand-driven ending: remove the source guest, prune the VLAN, time it all."""
        self.lab.agent(source, "DELETE", f"/v1/guests/{self.vm}")
        marks["clean_source"] = time.monotonic()
        self.lab.wire_vlan(self.config.vlan, [destination], before=[source, destination])
        marks["prune_vlan"] = time.monotonic()
        return Timing(total_ms=(time.monotonic() - started) * 1000, qemu=qemu,
                      phases=_phase_durations(started, marks))

    def request(self, *, incoming: bool) -> dict[str, Any]:
        return {"name": self.vm, "memory_mib": self.config.memory_mib, "mac": self.mac,
                "ip": self.ip, "vlan": self.config.vlan,
                "workload_mibps": self.config.workload_mibps, "incoming": incoming}

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

    def start_destination(self, destination: str) -> str:
        info = self.lab.agent(destination, "PUT", f"/v1/guests/{self.vm}",
                              body=self.request(incoming=True))
        uri = info.get("incoming_uri")
        if not uri:
            raise MigrationError(f"destination QEMU on {destination} is not waiting for the "
                                 f"stream (state {info.get('state')})", vm=self.vm)
        return str(uri)

    def run_qemu_migration(self, source: str, destination: str, uri: str) -> dict[str, Any]:
        """Start the QEMU migration on the source and wait, polling often, until it ends;
        returns QEMU's final report. Raises ``MigrationError`` or ``WaitTimeout``."""
        self.lab.agent(source, "POST", f"/v1/guests/{self.vm}/migrate",
                       body={"uri": uri, "max_downtime_ms": self.config.max_downtime_ms,
                             "auto_converge": True})
        deadline = time.monotonic() + self.config.migration_timeout_s
        while time.monotonic() < deadline:
            progress: dict[str, Any] = self.lab.agent(source, "GET",
                                                      f"/v1/guests/{self.vm}/migration")
            status = progress.get("status")
            if status == "completed":
                self._ensure_running(destination)
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
                       body=self.request(incoming=True))
        marks["wire"] = time.monotonic()
        uri = self.start_destination(destination)
        marks["start_destination"] = time.monotonic()
        qemu = self.run_qemu_migration(source, destination, uri)
        marks["qemu_migration"] = time.monotonic()
        return self.clean_and_prune(source, destination, started, marks, qemu)


class Naive(_HandDriven):
    name = "naive"
    description = ("destination QEMU's tap exists but its switch port and the VLAN on the "
                   "trunks are wired only after switchover; then announce, clean, prune")

    def migrate(self, source: str, destination: str) -> Timing:
        marks: dict[str, float] = {}
        started = time.monotonic()
        uri = self.start_destination(destination)
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

    def migrate(self, source: str, destination: str) -> Timing:
        started = time.monotonic()
        record: dict[str, Any] = self.lab.controller("POST", "/v1/migrations", body={
            "vm": self.vm, "to": destination, "postcopy": "never",
            "max_downtime_ms": self.config.max_downtime_ms,
            "timeout_s": self.config.migration_timeout_s})
        deadline = started + self.config.migration_timeout_s + 60
        while record["state"] in ("running", "rolling-back") and time.monotonic() < deadline:
            record = self.lab.controller("GET", f"/v1/migrations/{record['id']}",
                                         params={"wait": 30})
        total_ms = (time.monotonic() - started) * 1000
        if record["state"] != "completed":
            raise MigrationError(f"vmferry migrate ended {record['state']}: {record['error']}",
                                 vm=self.vm)
        phases = {p["phase"]: float(p.get("duration_ms") or 0.0) for p in record["phases"]}
        return Timing(total_ms=total_ms, qemu=dict(record["result"].get("qemu") or {}),
                      phases=phases)


VARIANTS: dict[str, type[Variant]] = {v.name: v for v in (Floor, Vmferry, Naive)}
# One address per variant so a client's ARP cache never carries a MAC across variants.
ADDRESSES = {"floor": "192.0.2.51/24", "vmferry": "192.0.2.52/24", "naive": "192.0.2.53/24",
             "ovn": "192.0.2.54/24"}


def _phase_durations(started: float, marks: dict[str, float]) -> dict[str, float]:
    result: dict[str, float] = {}
    previous = started
    for name, moment in marks.items():
        result[name] = round((moment - previous) * 1000, 1)
        previous = moment
    return result


# ---- the benchmark ------------------------------------------------------------------------

def measure(variant: Variant, run: int, source: str, destination: str) -> RunResult:
    """One migration under the probe. Failures become a failed RunResult, not an exception."""
    config = variant.config
    namespace = variant.probe_namespace
    result = RunResult(variant=variant.name, run=run, source=source, destination=destination,
                       ok=False)
    wait_reachable(namespace, variant.address, timeout=60)
    probe = PingProbe(namespace, variant.address, interval_ms=config.interval_ms,
                      max_seconds=config.warmup_s + config.migration_timeout_s + 60)
    probe.start()
    try:
        time.sleep(config.warmup_s)
        timing = variant.migrate(source, destination)
        time.sleep(config.tail_s)
    except VmferryError as exc:
        probe.kill()
        result.error = exc.message
        return result
    except BaseException:
        probe.kill()
        raise
    seen = probe.stop()
    result.ok = True
    result.lost = seen.lost
    result.blackout_ms = seen.blackout_ms
    result.reply_gap_ms = seen.reply_gap_ms
    result.probe = seen.as_dict()
    result.total_ms = round(timing.total_ms, 1)
    result.qemu_downtime_ms = timing.qemu.get("downtime_ms")
    result.qemu_total_ms = timing.qemu.get("total_time_ms")
    result.phases = timing.phases
    return result


def run_benchmark(config: BenchConfig, say: Callable[[str], None] = lambda _: None,
                  on_run: Callable[[RunResult], None] = lambda _: None) -> dict[str, Any]:
    """Bring a lab up, run every variant ``config.runs`` times, bring the lab down (also on
    failure); returns the report (see ``report``). Raises ``VmferryError`` when the lab cannot
    be brought up."""
    topology = load_topology(config.topology or default_topology_path())
    topology = topology.model_copy(update={"name": config.lab_name})
    lab = BenchLab(topology, config.controller_port or free_port())
    started_at = datetime.now(UTC)
    results: dict[str, list[RunResult]] = {name: [] for name in config.variants}
    errors: dict[str, str] = {}
    try:
        lab.up(say)
        home, away = lab.rack_hosts()
        for name in config.variants:
            variant = VARIANTS[name](lab, config, ADDRESSES[name])
            say(f"{name}: placing the guest on {home}")
            where = home
            try:
                variant.prepare(home)
                for run in range(1, config.runs + 1):
                    destination = away if where == home else home
                    say(f"{name}: run {run}/{config.runs}, {where} -> {destination}")
                    result = measure(variant, run, where, destination)
                    results[name].append(result)
                    on_run(result)
                    if not result.ok:
                        errors[name] = result.error or "failed"
                        break
                    where = destination
            except VmferryError as exc:
                errors[name] = exc.message
            finally:
                try:
                    variant.finish(where)
                except VmferryError as exc:
                    errors.setdefault(name, f"cleanup: {exc.message}")
    finally:
        say("lab down")
        lab.down()
    return report(config, results, errors, started_at, lab.rack_hosts())


def report(config: BenchConfig, results: dict[str, list[RunResult]], errors: dict[str, str],
           started_at: datetime, hosts: tuple[str, str]) -> dict[str, Any]:
    """The JSON document: configuration, every run, per-variant statistics, the comparisons."""
    return {
        "benchmark": "migration",
        "started_at": started_at.isoformat(),
        "ended_at": datetime.now(UTC).isoformat(),
        "config": {**asdict(config), "topology": str(config.topology or default_topology_path()),
                   "variants": list(config.variants)},
        "hosts": list(hosts),
        "probe": f"ping -D every {config.interval_ms} ms from {config.client}",
        "variants": {
            name: {"description": VARIANTS[name].description,
                   "summary": summarize_runs(runs),
                   # How often ping really sent (a loaded machine makes it fall behind).
                   "probe_interval_ms": summarize(r.probe.get("effective_interval_ms")
                                                  for r in runs if r.ok),
                   "runs_ok": sum(1 for r in runs if r.ok),
                   "error": errors.get(name),
                   "runs": [asdict(r) for r in runs]}
            for name, runs in results.items()},
        "comparisons": compare(results),
    }


def write_report(document: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    os.replace(tmp, output)


# The peers register themselves last: they build on the classes above.
from vmferry.bench.ovn_lab import Ovn  # noqa: E402  (a peer builds on the classes above)

VARIANTS[Ovn.name] = Ovn
