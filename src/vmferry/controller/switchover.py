"""Make-before-break switchover: while a VM moves, frames for its MAC go to both hosts.

Between the moment QEMU pauses the guest on the source (stop-and-copy) and the moment the
fabric has learned the guest's new port, frames for the VM are forwarded by MAC learning to
the old port and lost there. During that window vmferry installs temporary OpenFlow rules,
all carrying one cookie per migration (``mbb_cookie``), that deliver every frame for the VM's
MAC on its VLAN towards *both* hosts:

    on every fabric switch on the path        dl_vlan=V,dl_dst=MAC -> output to the path's
    (source host ... destination host)        ports on both sides (OVS never sends a frame
                                              back out of its ingress port); untagged frames
                                              from local access ports of V get the tag first
    on the destination host's softswitch      in_port=uplink,dl_vlan=V,dl_dst=MAC ->
    (through its agent)                       pop the tag, output to the VM's tap

The source host needs nothing: the guest's port is still learned there. On the destination
the paused QEMU does not read its tap, so the frames wait in the tap's queue and the guest
reads them when it resumes, instead of their being lost on the source.

The migration engine owns one ``MakeBeforeBreak`` per run (contract H5): ``prepare`` when the
precopy starts, ``open`` when the source reports "pre-switchover", ``close`` right after the
destination has announced itself and on every ending of a migration (completed, rolled back,
failed, cancelled, recovered after a controller restart). This adaptation still puts the rules
in at ``prepare`` (the previous behaviour at the first progress poll); the switchover rework
(issue 10) moves them to ``open``. Removal is by cookie on
every switch and on both hosts, so it is idempotent and needs no memory of what was installed;
``leftovers`` finds temporary rules of migrations that are no longer running (``vmferry
audit``).

A guest with a port profile gets no rule on its host (a direct output would bypass the
profile's ACLs); the fabric rules still bring its frames to the destination host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from vmferry.api.agent_client import AgentClient
from vmferry.drivers.fabric.base import Fabric
from vmferry.drivers.softswitch.base import Flow
from vmferry.errors import VmferryError
from vmferry.model.fabric import path_between
from vmferry.model.switchover import (
    COOKIE_MASK,
    COOKIE_PREFIX,
    is_mbb_cookie,
    mbb_cookie,
    migration_of,
)
from vmferry.model.topology import Topology

log = logging.getLogger(__name__)

PRIORITY = 65000
LEAD_S = 1.0                  # install when QEMU expects to finish within this long
VLAN_PRESENT = 0x1000         # OpenFlow 1.3 vlan_vid "tag present" bit

__all__ = ["COOKIE_MASK", "COOKIE_PREFIX", "MakeBeforeBreak", "SwitchoverContext",
           "is_mbb_cookie", "leftovers", "mbb_cookie", "migration_of"]


# ---- what the rules are (pure) ------------------------------------------------------------

@dataclass(frozen=True)
class SwitchPorts:
    """What the rules of one fabric switch need to know about its ports."""

    ofports: Mapping[str, int]                          # port name -> OpenFlow number
    access_vlans: Mapping[str, int] = field(default_factory=dict)   # access port -> its VLAN


def path_ports(topology: Topology, source: str, destination: str) -> dict[str, list[str]]:
    """Fabric switch -> its ports towards its neighbours on the path source .. destination."""
    path = path_between(topology, source, destination)
    switches = {s.name for s in topology.switches}
    links: dict[frozenset[str], dict[str, str]] = {}
    for trunk in topology.trunks():
        links[frozenset((trunk.a, trunk.b))] = {trunk.a: trunk.a_port, trunk.b: trunk.b_port}
    result: dict[str, list[str]] = {}
    for index, node in enumerate(path):
        if node not in switches:
            continue
        ports: list[str] = []
        for neighbour in (path[index - 1] if index else None,
                          path[index + 1] if index + 1 < len(path) else None):
            if neighbour is not None:
                ports.append(links[frozenset((node, neighbour))][node])
        result[node] = ports
    return result


def fabric_flows(topology: Topology, vlan: int, mac: str, source: str, destination: str,
                 ports: Mapping[str, SwitchPorts]) -> dict[str, list[Flow]]:
    """The temporary rules of every fabric switch on the path (switch -> flows).

    Raises ``KeyError`` naming a switch or port missing from ``ports``."""
    mac = mac.lower()
    result: dict[str, list[Flow]] = {}
    for switch, names in path_ports(topology, source, destination).items():
        known = ports[switch]
        outputs = ",".join(f"output:{known.ofports[name]}" for name in names)
        flows = [Flow(0, PRIORITY, f"dl_vlan={vlan},dl_dst={mac}", outputs)]
        for port, port_vlan in sorted(known.access_vlans.items()):
            if port_vlan == vlan and port in known.ofports:
                flows.append(Flow(0, PRIORITY, f"in_port={known.ofports[port]},dl_dst={mac}",
                                  f"push_vlan:0x8100,set_field:{VLAN_PRESENT | vlan}->vlan_vid,"
                                  f"{outputs}"))
        result[switch] = flows
    return result


def due(progress: Mapping[str, Any], lead_s: float = LEAD_S) -> bool:
    """Whether the switchover is close enough for the rules to be in place: QEMU stopped the
    guest already, or its remaining bytes at its current rate take under ``lead_s`` seconds,
    or it cannot tell yet (short migrations finish before QEMU has a rate)."""
    status = progress.get("status")
    if status in {"pre-switchover", "device", "completed"}:
        return True
    rate_mbps = float(progress.get("mbps") or 0.0)
    remaining = int(progress.get("remaining_bytes") or 0)
    if rate_mbps <= 0:
        return True
    return remaining * 8 / (rate_mbps * 1e6) <= lead_s


# ---- doing it -----------------------------------------------------------------------------

@dataclass(frozen=True)
class SwitchoverContext:
    """What the make-before-break of one migration needs to know (contract H5)."""

    migration_id: int
    vm: str
    mac: str
    vlan: int
    source: str
    destination: str
    has_profile: bool
    topology: Topology
    fabric: Fabric
    agent: Callable[[str], AgentClient]


class MakeBeforeBreak:
    """The temporary rules of one migration; the engine owns one per run."""

    # The engine asks QEMU to stop in "pre-switchover" when this is set. Off in this
    # adaptation: the rules go in at prepare().
    pause_before_switchover = False

    def __init__(self, ctx: SwitchoverContext) -> None:
        self.ctx = ctx
        self.cookie = mbb_cookie(ctx.migration_id)
        self.installed = False

    def prepare(self) -> None:
        """When the precopy starts: put the rules in. Raises ``SwitchoverError``."""
        self.open()

    def open(self) -> None:
        """Put the rules on the fabric switches on the path and on the destination host
        (idempotent). Raises ``SwitchoverError``."""
        if self.installed:
            return
        ctx = self.ctx
        wanted = path_ports(ctx.topology, ctx.source, ctx.destination)
        try:
            ports = {switch: fabric_switch_ports(ctx.fabric, switch) for switch in wanted}
        except VmferryError as exc:
            raise SwitchoverError(exc.message) from exc
        flows = fabric_flows(ctx.topology, ctx.vlan, ctx.mac, ctx.source, ctx.destination,
                             ports)
        tasks: list[Callable[[], Any]] = [
            partial(ctx.fabric.replace_flows, switch, self.cookie, switch_flows)  # type: ignore[attr-defined]
            for switch, switch_flows in flows.items()]
        if not ctx.has_profile:
            tasks.append(partial(ctx.agent(ctx.destination).open_switchover, ctx.vm,
                                 self.cookie, ctx.vlan, ctx.mac))
        self.installed = True       # a partial install is removed like a whole one
        problems = _all(tasks)
        if problems:
            raise SwitchoverError("; ".join(problems))
        log.info("migration %s: make-before-break rules in place on %s", ctx.migration_id,
                 ", ".join(flows))

    def close(self) -> list[str]:
        """Remove the rules (by cookie) from every fabric switch and both hosts; returns the
        problems met (never raises: every ending of a migration calls this)."""
        ctx = self.ctx
        tasks: list[Callable[[], Any]] = [
            partial(ctx.fabric.replace_flows, switch.name, self.cookie, [])  # type: ignore[attr-defined]
            for switch in ctx.topology.switches]
        tasks += [partial(_close_on, ctx.agent, host, self.cookie)
                  for host in (ctx.destination, ctx.source)]
        problems = _all(tasks)
        self.installed = False
        if problems:
            log.warning("migration %s: make-before-break rules not all removed: %s",
                        ctx.migration_id, "; ".join(problems))
        return problems


def _close_on(agent: Callable[[str], AgentClient], host: str, cookie: int) -> None:
    agent(host).close_switchover(cookie)


class SwitchoverError(VmferryError):
    """The make-before-break rules could not all be put in place."""


def _all(tasks: list[Callable[[], Any]]) -> list[str]:
    """Run the tasks side by side; the messages of those that failed."""
    problems: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, len(tasks))) as pool:
        for future in [pool.submit(task) for task in tasks]:
            try:
                future.result()
            except VmferryError as exc:
                problems.append(exc.message)
    return problems


def fabric_switch_ports(fabric: Fabric, switch: str) -> SwitchPorts:
    """Read a fabric switch's ports. Raises ``VmferryError``."""
    states = fabric.ports(switch)  # type: ignore[attr-defined]  # Fabric gains it (H3)
    return SwitchPorts(
        ofports={name: s.ofport for name, s in states.items() if s.ofport is not None},
        access_vlans={name: s.tag for name, s in states.items()
                      if s.vlan_mode in (None, "access") and s.tag is not None})


def leftovers(fabric: Fabric, switches: Iterable[str], live: set[int]) -> list[tuple[str, int]]:
    """(switch, cookie) of every temporary rule on ``switches`` whose migration is not in
    ``live``. Raises ``VmferryError`` when a switch cannot be read."""
    found: list[tuple[str, int]] = []
    for switch in switches:
        for cookie in sorted(fabric.flow_cookies(switch)):  # type: ignore[attr-defined]  # H3
            if is_mbb_cookie(cookie) and migration_of(cookie) not in live:
                found.append((switch, cookie))
    return found
