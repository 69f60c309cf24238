"""Benchmark figures of the OVS driver itself (what the functional tests used to time):

- ``trunk_heal_s``: a VLAN put back on a trunk (``set_trunks``) until the first ping across it
  is answered. Peer: ``ovs-vsctl set port ... trunks=...``.
- ``port_forwarding_s``: a new access port (``ensure_port``) until the first ping through it
  is answered. Peer: ``ovs-vsctl add-port ... tag=...``.
- ``wait_timeout_s``: ``wait_for_port(timeout=0.5)`` on a port that never comes, until it
  gives up (how far past its timeout a wait overshoots). No peer.

Lab, on the benchmark's private Open vSwitch (its namespace ``ovs_ns``)::

    h1 --hc1 [br-ha] pt-ab ==patch trunk 100,200== pt-ba [br-hb] hc2 -- h2
                                                              hc3 -- h3 (added and removed)

all access ports on VLAN 100, addresses from 192.0.2.0/24 (RFC 5737), neighbours static so
the figures measure the switch, not ARP. Pings run at 10 ms intervals (the resolution) from
the benchmark's own namespaces to its own namespaces only.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmferry import privileged
from vmferry.drivers.softswitch.base import PortSpec
from vmferry.drivers.softswitch.ovs import OvsSoftswitch
from vmferry.errors import SoftswitchError, WaitTimeout
from vmferry.lab.ovs_instance import OvsInstance

BRIDGE_A = "br-ha"
BRIDGE_B = "br-hb"
VLAN = 100
TRUNK = frozenset({100, 200})
WAIT_TIMEOUT_S = 0.5
PING_INTERVAL_S = 0.01
PING_DEADLINE_S = 5


@dataclass(frozen=True)
class _Lab:
    ovs_ns: str
    hosts: dict[str, str]          # role -> namespace
    db_socket: str


def _client(lab_ovs_ns: str, namespace: str, switch_side: str, address: str) -> str:
    """A namespace with eth0 at ``address``, its other end ``switch_side`` in the OVS
    namespace; returns eth0's MAC."""
    privileged.create_namespace(namespace)
    privileged.create_veth(lab_ovs_ns, switch_side, namespace, "eth0")
    privileged.add_address(namespace, "eth0", f"{address}/24")
    found = privileged.run_in_namespace(namespace, ["cat", "/sys/class/net/eth0/address"])
    return found.stdout.strip()


def _static_neighbours(namespaces: dict[str, tuple[str, str]]) -> None:
    """Every namespace knows every other's MAC: ``{ns: (address, mac)}``."""
    for namespace in namespaces:
        for other, (address, mac) in namespaces.items():
            if other != namespace:
                privileged.run_in_namespace(namespace, [
                    "ip", "neigh", "replace", address, "lladdr", mac, "dev", "eth0",
                    "nud", "permanent"])


def _first_reply_after(namespace: str, address: str, change: Callable[[], object]) -> float:
    """Seconds from the start of ``change()`` until the first ping reply from ``address``
    (pings already running at 10 ms intervals when the change starts). Raises
    ``WaitTimeout`` if none comes within the ping deadline."""
    argv = ["ping", "-n", "-D", "-c", "1", "-i", f"{PING_INTERVAL_S}", "-w",
            str(PING_DEADLINE_S), address]
    ping = subprocess.Popen(privileged.netns_argv(namespace, argv), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.05)            # let ping start sending before the change
        started = time.time()
        change()
        out, _ = ping.communicate(timeout=PING_DEADLINE_S + 5)
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait()
    found = re.search(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.MULTILINE)
    if found is None:
        raise WaitTimeout(f"a ping reply from {address} in {namespace}", PING_DEADLINE_S)
    return float(found.group(1)) - started


def _silent(namespace: str, address: str) -> None:
    """Raises ``SoftswitchError`` unless pings to ``address`` go unanswered (the cut held)."""
    result = privileged.run_in_namespace(namespace, [
        "ping", "-n", "-q", "-c", "3", "-i", "0.05", "-W", "0.3", address], check=False)
    if " 0 received" not in result.stdout:
        raise SoftswitchError("benchmark lab: traffic still flows after the VLAN was removed",
                              cause=result.stdout.strip()[-200:])


def _vsctl(lab: _Lab, *args: str) -> None:
    subprocess.run(["ovs-vsctl", f"--db=unix:{lab.db_socket}", "--timeout=10", *args],
                   check=True, capture_output=True, timeout=30)


def _trunk_heal(switch: OvsSoftswitch, lab: _Lab, by_hand: bool) -> float:
    switch.set_trunks(BRIDGE_A, "pt-ab", frozenset({200}))
    switch.settle()
    _silent(lab.hosts["h1"], "192.0.2.12")
    if by_hand:
        return _first_reply_after(lab.hosts["h1"], "192.0.2.12", lambda: _vsctl(
            lab, "set", "port", "pt-ab", "trunks=" + ",".join(map(str, sorted(TRUNK)))))
    return _first_reply_after(lab.hosts["h1"], "192.0.2.12",
                              lambda: switch.set_trunks(BRIDGE_A, "pt-ab", TRUNK))


def _port_forwarding(switch: OvsSoftswitch, lab: _Lab, by_hand: bool) -> float:
    switch.delete_port(BRIDGE_B, "hc3")
    switch.settle()
    if by_hand:
        seconds = _first_reply_after(lab.hosts["h3"], "192.0.2.12", lambda: _vsctl(
            lab, "add-port", BRIDGE_B, "hc3", f"tag={VLAN}"))
    else:
        seconds = _first_reply_after(lab.hosts["h3"], "192.0.2.12", lambda: switch.ensure_port(
            BRIDGE_B, PortSpec("hc3", tag=VLAN, vlan_mode="access")))
    switch.delete_port(BRIDGE_B, "hc3")
    return seconds


def _wait_timeout(switch: OvsSoftswitch) -> float:
    started = time.perf_counter()
    try:
        switch.wait_for_port(BRIDGE_B, "never0", timeout=WAIT_TIMEOUT_S)
    except WaitTimeout:
        return time.perf_counter() - started
    raise SoftswitchError("benchmark lab: a port that does not exist got a number")


def _build(switch: OvsSoftswitch, instance: OvsInstance, ovs_ns: str) -> _Lab:
    hosts = {role: f"{ovs_ns}-{role}" for role in ("h1", "h2", "h3")}
    lab = _Lab(ovs_ns, hosts, str(instance.db_socket))
    for bridge in (BRIDGE_A, BRIDGE_B):
        switch.ensure_bridge(bridge)
    switch.ensure_port(BRIDGE_A, PortSpec("pt-ab", iface_type="patch", options={"peer": "pt-ba"},
                                          trunks=TRUNK, vlan_mode="trunk"))
    switch.ensure_port(BRIDGE_B, PortSpec("pt-ba", iface_type="patch", options={"peer": "pt-ab"},
                                          trunks=TRUNK, vlan_mode="trunk"))
    neighbours: dict[str, tuple[str, str]] = {}
    for index, (role, side) in enumerate((("h1", "hc1"), ("h2", "hc2"), ("h3", "hc3")), 11):
        address = f"192.0.2.{index}"
        neighbours[hosts[role]] = (address, _client(ovs_ns, hosts[role], side, address))
    _static_neighbours(neighbours)
    switch.ensure_port(BRIDGE_A, PortSpec("hc1", tag=VLAN, vlan_mode="access"))
    switch.ensure_port(BRIDGE_B, PortSpec("hc2", tag=VLAN, vlan_mode="access"))
    return lab


def measure(instance: OvsInstance, switch: OvsSoftswitch, ovs_ns: str, runs: int
            ) -> dict[str, tuple[list[float], list[float]]]:
    """``{figure: (vmferry seconds, peer seconds)}``, runs interleaved with the peer's; the
    lab is removed afterwards, even on failure. Raises ``VmferryError``."""
    lab = _build(switch, instance, ovs_ns)
    try:
        figures: dict[str, tuple[list[float], list[float]]] = {
            "trunk_heal_s": ([], []), "port_forwarding_s": ([], []), "wait_timeout_s": ([], [])}
        for _ in range(runs):
            for key, step in (("trunk_heal_s", _trunk_heal),
                              ("port_forwarding_s", _port_forwarding)):
                figures[key][0].append(step(switch, lab, False))
                figures[key][1].append(step(switch, lab, True))
            figures["wait_timeout_s"][0].append(_wait_timeout(switch))
        return figures
    finally:
        for namespace in lab.hosts.values():
            privileged.delete_namespace(namespace)
        for bridge in (BRIDGE_A, BRIDGE_B):
            switch.delete_bridge(bridge)
