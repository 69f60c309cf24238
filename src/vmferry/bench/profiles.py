"""Benchmark: how fast a port profile is realized on one port, and a change converges on 50.

Runs on a private Open vSwitch (one ovsdb-server + ovs-vswitchd, netdev datapath) in a
namespace of its own, with internal ports standing in for VM taps; everything is removed at
the end. Targets (issue 3): under 50 ms for one port, under 2 s for 50 ports.

Two figures, each with its hand-wired peer measured in the same run, runs interleaved:

- one port: ``port_profile.realize`` on a port without a profile (the port's row, meters and
  flows; it reads the switch back and writes the difference). Peer: the same meters and flows
  written blind, no reads, no OVSDB: one ``ovs-ofctl add-meter`` per meter in sequence, as a
  shell script would, then one ``ovs-ofctl --no-names --bundle add-flows``.
- converge: a profile change (an ACL port and a rate) reaching every port of the host, as the
  agent applies it (``port_profile.realize_many``: one OVSDB transaction, one bundle).
  Peer: the same change by hand: one ``mod-meter`` per changed meter in sequence, then one
  bundle rewriting every port's flows (``delete`` by cookie, then every flow ``add``).

Also the driver's own figures, which functional tests used to assert on (tests time nothing):
a VLAN restored on a trunk until traffic heals, a new access port until it forwards (each
against ``ovs-vsctl`` by hand), and how long a port wait with a 0.5 s timeout takes to give
up (``softswitch_figures``; reported under ``"switch"``, targets the old test bounds).

    vmferry bench profiles [--runs 7] [--ports 50] [--output bench-results/profiles.json]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmferry import privileged
from vmferry.bench import softswitch_figures
from vmferry.drivers.softswitch.base import Flow, Meter, PortSpec
from vmferry.drivers.softswitch.ovs import (
    OPENFLOW,
    OvsSoftswitch,
    flow_add_text,
    meter_text,
    profile_flows,
)
from vmferry.drivers.softswitch.ovs import profile as port_profile
from vmferry.errors import SoftswitchError
from vmferry.lab.ovs_instance import OvsInstance
from vmferry.model.profile import PortProfile, parse_profile

BRIDGE = "br-bench"
TARGET_ONE_PORT_S = 0.050
TARGET_CONVERGE_S = 2.0
# The bounds the functional tests used to assert (issue 9: they are benchmark figures now).
SWITCH_TARGETS_S = {"trunk_heal_s": 3.0, "port_forwarding_s": 5.0, "wait_timeout_s": 3.0}
SWITCH_PEERS = {"trunk_heal_s": "ovs-vsctl set port PORT trunks=...",
                "port_forwarding_s": "ovs-vsctl add-port BRIDGE PORT tag=...",
                "wait_timeout_s": None}


def _profile(version: int, deny_port: int) -> PortProfile:
    return parse_profile({
        "name": "bench", "version": version, "vlan": 100,
        "acl": {"to_vm": {"default": "deny", "rules": [
            {"action": "allow", "protocol": "tcp", "port": 80},
            {"action": "deny", "protocol": "tcp", "port": deny_port},
            {"action": "allow", "protocol": "udp", "port": "1000-1100",
             "remote": "198.51.100.0/24"},
            {"action": "allow", "protocol": "icmp"}]}},
        "qos": {"to_vm": {"rate_kbps": 10_000 + version}, "from_vm": {"rate_kbps": 10_000}},
        "storm_control": {"broadcast_pps": 100, "multicast_pps": 200}})


def _ports(switch: OvsSoftswitch, count: int) -> list[port_profile.PortRequest]:
    """``count`` internal ports on the bridge, as requests without a profile yet."""
    names = [f"bp{index}" for index in range(count)]
    switch.ensure_ports(BRIDGE, [PortSpec(name=name, tag=100, vlan_mode="access",
                                          iface_type="internal",
                                          external_ids={"vmferry-owner": "bench"})
                                 for name in names])
    for name in names:
        switch.wait_for_port(BRIDGE, name)
    return [port_profile.PortRequest(
        port=name, vm_mac=f"52:54:00:be:{index >> 8:02x}:{index & 0xff:02x}",
        vm_ips=(f"192.0.2.{index % 250 + 1}/24",), profile=_profile(1, 8080))
        for index, name in enumerate(names)]


@dataclass
class _Wanted:
    """What a profile puts on one port, in the words a hand-written script would use."""

    cookie: int
    flows: list[Flow]
    meters: list[Meter]


def _wanted(switch: OvsSoftswitch, request: port_profile.PortRequest) -> _Wanted:
    state = switch.ports(BRIDGE, [request.port])[request.port]
    assert state.ofport is not None
    alloc = profile_flows.allocate(request.port, switch.port_external_ids(BRIDGE))
    want = profile_flows.desired_port(state, state.ofport, request.vm_mac,
                                      [ip.split("/")[0] for ip in request.vm_ips],
                                      request.profile, alloc)
    return _Wanted(alloc.cookie, want.flows, want.meters)


class _HandWired:
    """The peer: ovs-ofctl run by hand, writing blind (no dumps, no diff, no OVSDB)."""

    def __init__(self, switch: OvsSoftswitch) -> None:
        self.target = switch.mgmt_target(BRIDGE)

    def _run(self, argv: list[str], stdin: str | None = None) -> None:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                timeout=30, check=False)
        if result.returncode != 0:
            raise SoftswitchError(f"hand-wired {argv[3]} failed", cause=result.stderr.strip())

    def meters(self, command: str, meters: list[Meter]) -> None:
        for meter in meters:
            self._run(["ovs-ofctl", "-O", OPENFLOW, command, self.target, meter_text(meter)])

    def bundle(self, wanted: list[_Wanted], *, delete_first: bool) -> None:
        lines = []
        for port in wanted:
            if delete_first:
                lines.append(f"delete cookie=0x{port.cookie:x}/-1")
            lines += [flow_add_text(port.cookie, flow) for flow in port.flows]
        self._run(["ovs-ofctl", "-O", OPENFLOW, "--no-names", "--bundle", "add-flows",
                   self.target, "-"], stdin="\n".join(lines) + "\n")


def _timed(action: Callable[..., object], *args: Any) -> float:
    started = time.perf_counter()
    action(*args)
    return time.perf_counter() - started


def _one_port(switch: OvsSoftswitch, request: port_profile.PortRequest, runs: int
              ) -> tuple[list[float], list[float]]:
    """(vmferry, peer) seconds to put a profile on a port that has none."""
    peer = _HandWired(switch)
    ours: list[float] = []
    theirs: list[float] = []
    for attempt in range(runs):
        profile = _profile(attempt + 1, 8080)
        port_profile.remove(switch, BRIDGE, request.port)
        ours.append(_timed(port_profile.realize, switch, BRIDGE, request.port, request.vm_mac,
                           request.vm_ips, profile))
        port_profile.remove(switch, BRIDGE, request.port)
        wanted = _wanted(switch, port_profile.PortRequest(
            request.port, request.vm_mac, request.vm_ips, profile))

        def by_hand(wanted: _Wanted = wanted) -> None:
            peer.meters("add-meter", wanted.meters)
            peer.bundle([wanted], delete_first=False)

        theirs.append(_timed(by_hand))
        # What the peer wrote carries the port's cookie and meter block: remove() finds the
        # flows by cookie; the meters are removed by id.
        switch.replace_flows(BRIDGE, wanted.cookie, [])
        switch.replace_meters(BRIDGE, [], {m.meter_id for m in wanted.meters})
    port_profile.remove(switch, BRIDGE, request.port)
    return ours, theirs


def _converge(switch: OvsSoftswitch, requests: list[port_profile.PortRequest], runs: int
              ) -> tuple[list[float], list[float]]:
    """(vmferry, peer) seconds for a profile change to reach every port."""
    peer = _HandWired(switch)
    port_profile.realize_many(switch, BRIDGE, requests)
    version = 1
    ours: list[float] = []
    theirs: list[float] = []

    def change() -> list[port_profile.PortRequest]:
        nonlocal version
        version += 1
        profile = _profile(version, 8080 + version)
        return [port_profile.PortRequest(r.port, r.vm_mac, r.vm_ips, profile)
                for r in requests]

    for _ in range(runs):
        changed = change()
        ours.append(_timed(port_profile.realize_many, switch, BRIDGE, changed))
        before = [_wanted(switch, r) for r in changed]
        changed = change()
        after = [_wanted(switch, r) for r in changed]
        # A knowledgeable hand changes only the meters whose settings changed.
        modified = [m for old, new in zip(before, after, strict=True)
                    for m in new.meters if m not in old.meters]

        def by_hand(modified: list[Meter] = modified, after: list[_Wanted] = after) -> None:
            peer.meters("mod-meter", modified)
            peer.bundle(after, delete_first=True)

        theirs.append(_timed(by_hand))
    return ours, theirs


def _summary(ours: list[float], theirs: list[float], target: float) -> dict[str, Any]:
    median = statistics.median(ours)
    peer = statistics.median(theirs) if theirs else None
    return {"median_s": median, "min_s": min(ours), "max_s": max(ours), "target_s": target,
            "met": median < target, "peer_median_s": peer,
            "ratio_to_peer": round(median / peer, 2) if peer else None,
            "samples_s": ours, "peer_samples_s": theirs}


def run(runs: int = 7, ports: int = 50) -> dict[str, Any]:
    """Measure; returns the JSON document (medians, samples, peers). Raises
    ``VmferryError``."""
    privileged.require_root()
    started_at = datetime.now(UTC)
    namespace = f"vfbench-prof-{os.getpid()}"
    base = Path(tempfile.mkdtemp(prefix="vfbp-", dir="/tmp"))
    instance = OvsInstance("bench", namespace, base)
    privileged.create_namespace(namespace)
    try:
        instance.start()
        with instance.softswitch() as switch:
            switch.ensure_bridge(BRIDGE)
            requests = _ports(switch, ports)
            flows_per_port = len(_wanted(switch, requests[0]).flows)
            one = _one_port(switch, requests[0], runs)
            many = _converge(switch, requests, runs)
            for request in requests:
                port_profile.remove(switch, BRIDGE, request.port)
                switch.delete_port(BRIDGE, request.port)
            switch.delete_bridge(BRIDGE)
            driver = softswitch_figures.measure(instance, switch, namespace, runs)
    finally:
        instance.stop()
        privileged.delete_namespace(namespace)
        shutil.rmtree(base, ignore_errors=True)
    return {
        "benchmark": "profiles",
        "started_at": started_at.isoformat(),
        "ended_at": datetime.now(UTC).isoformat(),
        "config": {"runs": runs, "ports": ports, "datapath": "netdev",
                   "flows_per_port": flows_per_port},
        "peer": ("hand-wired ovs-ofctl, writing blind: meters one call each in sequence, "
                 "flows in one --no-names --bundle add-flows (converge: delete by cookie and "
                 "re-add every port's flows)"),
        "realize_one_port": _summary(*one, TARGET_ONE_PORT_S),
        "converge_change": _summary(*many, TARGET_CONVERGE_S),
        "switch": {key: {**_summary(*driver[key], SWITCH_TARGETS_S[key]),
                         "peer": SWITCH_PEERS[key]} for key in SWITCH_TARGETS_S},
    }


def write_report(document: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, output)
