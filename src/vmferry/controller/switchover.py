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

The rules go in when the precopy is close to its end (``during_precopy``: QEMU's estimate of
the time left is under ``LEAD_S``, or it cannot estimate yet) and are removed (``close``) right
after the destination has announced itself, and on every ending of a migration (completed,
rolled back, failed, cancelled, recovered after a controller restart). Removal is by cookie on
every switch and on both hosts, so it is idempotent and needs no memory of what was installed;
``leftovers`` finds temporary rules of migrations that are no longer running (``vmferry
audit``).

A guest with a port profile gets no rule on its host (a direct output would bypass the
profile's ACLs); the fabric rules still bring its frames to the destination host.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from vmferry.drivers.softswitch.base import Flow
from vmferry.errors import VmferryError
from vmferry.model.fabric import path_between
from vmferry.model.topology import Topology

log = logging.getLogger(__name__)

# "mbb" in the top 24 bits, the migration id below: a cookie of its own per migration.
COOKIE_PREFIX = 0x6D6262 << 40
COOKIE_MASK = 0xFFFFFF << 40
PRIORITY = 65000
LEAD_S = 1.0                  # install when QEMU expects to finish within this long
WITHDRAW_S = 4.0              # ...and withdraw again if the estimate grows beyond this
VLAN_PRESENT = 0x1000         # OpenFlow 1.3 vlan_vid "tag present" bit
OPTION = "make_before_break"
LEAD_OPTION = "make_before_break_lead_s"
ACTIVE_STATES = {"setup", "active", "pre-switchover", "device"}


def mbb_cookie(migration_id: int) -> int:
    """The cookie of one migration's temporary rules."""
    if not 0 < migration_id < 1 << 40:
        raise ValueError(f"migration id {migration_id} does not fit a switchover cookie")
    return COOKIE_PREFIX | migration_id


def is_mbb_cookie(cookie: int) -> bool:
    return cookie & COOKIE_MASK == COOKIE_PREFIX and cookie != COOKIE_PREFIX


def migration_of(cookie: int) -> int:
    return cookie & ~COOKIE_MASK


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


def host_flows(uplink_ofport: int, tap_ofport: int, vlan: int, mac: str) -> list[Flow]:
    """The destination host's temporary rule: frames for the VM from the uplink go to its tap
    (untagged, as its access port would deliver them)."""
    return [Flow(0, PRIORITY, f"in_port={uplink_ofport},dl_vlan={vlan},dl_dst={mac.lower()}",
                 f"pop_vlan,output:{tap_ofport}")]


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

class RunLike(Protocol):
    """What a migration run gives the switchover (``vmferry.controller.migration._Run``)."""

    id: int
    vm: str
    source: str
    destination: str
    options: dict[str, Any]
    controller: Any

    def _vm_row(self) -> dict[str, Any]: ...

    def _record_result(self, **values: Any) -> None: ...


class SwitchoverWindow:
    """The temporary rules of one migration."""

    def __init__(self, run: RunLike) -> None:
        self.run = run
        self.cookie = mbb_cookie(run.id)
        self.installed = False
        self.installs = 0

    @property
    def lead_s(self) -> float:
        return float(self.run.options.get(LEAD_OPTION) or LEAD_S)

    def enabled(self) -> bool:
        return bool(self.run.options.get(OPTION, True))

    def install(self) -> None:
        """Put the rules on the fabric switches on the path and on the destination host.
        Raises ``VmferryError``."""
        run = self.run
        vm = run._vm_row()
        topology = run.controller.topology()
        fabric = run.controller.fabric_driver()
        wanted = path_ports(topology, run.source, run.destination)
        ports = {switch: fabric_switch_ports(fabric, switch) for switch in wanted}
        flows = fabric_flows(topology, vm["vlan"], vm["mac"], run.source, run.destination,
                             ports)
        tasks: list[Callable[[], Any]] = [
            partial(fabric.replace_flows, switch, self.cookie, switch_flows)
            for switch, switch_flows in flows.items()]
        if not vm.get("profile"):
            tasks.append(partial(
                run.controller.call_agent, run.destination, "PUT",
                f"/v1/make-before-break/{run.vm}",
                json={"cookie": self.cookie, "vlan": vm["vlan"], "mac": vm["mac"]}, timeout=15))
        # Side by side: the window must open in the time the precopy leaves.
        self.installed = True       # a partial install is removed like a whole one
        problems = _all(tasks)
        self.installs += 1
        run._record_result(make_before_break="installed",
                           make_before_break_installs=self.installs,
                           make_before_break_cookie=f"{self.cookie:#x}")
        if problems:
            raise SwitchoverError("; ".join(problems))
        log.info("migration %s: make-before-break rules in place on %s", run.id,
                 ", ".join(flows))

    def remove(self) -> list[str]:
        """Remove the rules (by cookie) from every fabric switch and both hosts; returns the
        problems met (never raises: every ending of a migration calls this)."""
        run = self.run
        try:
            topology = run.controller.topology()
            fabric = run.controller.fabric_driver()
        except VmferryError as exc:
            return [f"fabric: {exc.message}"]
        tasks: list[Callable[[], Any]] = [
            partial(fabric.replace_flows, switch.name, self.cookie, [])
            for switch in topology.switches]
        tasks += [partial(run.controller.call_agent, host, "DELETE",
                          f"/v1/make-before-break/{self.cookie}", timeout=15)
                  for host in (run.destination, run.source)]
        problems = _all(tasks)
        self.installed = False
        return problems


_windows: dict[int, SwitchoverWindow] = {}
_closed: set[int] = set()      # runs (by id of the run object) closed in this process
_lock = threading.Lock()


def _window(run: RunLike) -> SwitchoverWindow:
    with _lock:
        window = _windows.get(run.id)
        if window is None or window.run is not run:
            window = _windows[run.id] = SwitchoverWindow(run)
        return window


def during_precopy(run: RunLike, progress: Mapping[str, Any]) -> None:
    """Called on every precopy poll: put the rules in when the switchover is near, take them
    out again if the precopy turned out long (their queue on the destination would fill).
    Failing to install is logged, not raised: the migration works without the rules."""
    window = _window(run)
    if not window.enabled() or progress.get("status") not in ACTIVE_STATES:
        return
    try:
        if not window.installed and due(progress, window.lead_s):
            window.install()
        elif window.installed and not due(progress, max(WITHDRAW_S, 4 * window.lead_s)):
            problems = window.remove()
            run._record_result(make_before_break="withdrawn")
            if problems:
                log.warning("migration %s: withdrawing make-before-break rules: %s", run.id,
                            "; ".join(problems))
    except VmferryError as exc:
        log.warning("migration %s: make-before-break rules not installed: %s", run.id,
                    exc.message)


def close(run: RunLike) -> list[str]:
    """Remove the rules of ``run``'s migration, wherever they are; idempotent, never raises."""
    with _lock:
        window = _windows.pop(run.id, None)
        if window is None and id(run) in _closed:
            return []           # closed by this run already, nothing installed since
        _closed.add(id(run))
    if window is None:
        window = SwitchoverWindow(run)
    problems = window.remove()
    try:
        run._record_result(make_before_break="removed" if not problems else "removal-failed",
                           make_before_break_problems=problems)
    except Exception:  # recording must not break an ending migration
        log.exception("migration %s: cannot record the switchover rules' removal", run.id)
    if problems:
        log.warning("migration %s: make-before-break rules not all removed: %s", run.id,
                    "; ".join(problems))
    return problems


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


def fabric_switch_ports(fabric: Any, switch: str) -> SwitchPorts:
    """Read a fabric switch's ports. Raises ``VmferryError``."""
    states = fabric.ports(switch)
    return SwitchPorts(
        ofports={name: s.ofport for name, s in states.items() if s.ofport is not None},
        access_vlans={name: s.tag for name, s in states.items()
                      if s.vlan_mode in (None, "access") and s.tag is not None})


def leftovers(fabric: Any, switches: Iterable[str], live: set[int]) -> list[tuple[str, int]]:
    """(switch, cookie) of every temporary rule on ``switches`` whose migration is not in
    ``live``. Raises ``VmferryError`` when a switch cannot be read."""
    found: list[tuple[str, int]] = []
    for switch in switches:
        for cookie in sorted(fabric.flow_cookies(switch)):
            if is_mbb_cookie(cookie) and migration_of(cookie) not in live:
                found.append((switch, cookie))
    return found
