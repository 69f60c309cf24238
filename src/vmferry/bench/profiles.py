"""Benchmark: how fast a port profile is realized on one port, and a change converges on 50.

Runs on a private Open vSwitch (one ovsdb-server + ovs-vswitchd, netdev datapath) in a
namespace of its own, with internal ports standing in for VM taps; everything is removed at
the end. Targets (issue 3): under 50 ms for one port, under 2 s for 50 ports.

    vmferry bench profiles [--runs 7] [--ports 50]
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from vmferry import privileged
from vmferry.agent import port_profile
from vmferry.drivers.softswitch.base import PortSpec
from vmferry.drivers.softswitch.ovs import OvsSoftswitch
from vmferry.drivers.softswitch.ovs_instance import OvsInstance
from vmferry.model.profile import PortProfile, parse_profile

BRIDGE = "br-bench"


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


def _ports(switch: OvsSoftswitch, count: int) -> list[tuple[str, str, str]]:
    """``count`` internal ports on the bridge: (name, mac, ip)."""
    result = []
    for index in range(count):
        name = f"bp{index}"
        switch.ensure_port(BRIDGE, PortSpec(name=name, tag=100, vlan_mode="access",
                                            iface_type="internal",
                                            external_ids={"vmferry-owner": "bench"}))
        result.append((name, f"52:54:00:be:{index >> 8:02x}:{index & 0xff:02x}",
                       f"192.0.2.{index % 250 + 1}/24"))
    for name, _, _ in result:
        switch.wait_for_port(BRIDGE, name)
    return result


def run(runs: int = 7, ports: int = 50) -> dict[str, Any]:
    """Measure; returns medians and all samples in seconds. Raises ``VmferryError``."""
    privileged.require_root()
    namespace = f"vfbench-prof-{os.getpid()}"
    base = Path(tempfile.mkdtemp(prefix="vfbp-", dir="/tmp"))
    instance = OvsInstance("bench", namespace, base)
    privileged.create_namespace(namespace)
    try:
        instance.start()
        with instance.softswitch() as switch:
            switch.ensure_bridge(BRIDGE)
            members = _ports(switch, ports)
            one_port: list[float] = []
            name, mac, ip = members[0]
            for attempt in range(runs):
                port_profile.remove(switch, BRIDGE, name)
                started = time.perf_counter()
                port_profile.realize(switch, BRIDGE, name, mac, [ip],
                                     _profile(attempt + 1, 8080))
                one_port.append(time.perf_counter() - started)
            port_profile.remove(switch, BRIDGE, name)
            for name, mac, ip in members:
                port_profile.realize(switch, BRIDGE, name, mac, [ip], _profile(1, 8080))
            converge: list[float] = []
            for attempt in range(runs):
                changed = _profile(attempt + 2, 8081 + attempt)
                started = time.perf_counter()
                for name, mac, ip in members:
                    port_profile.realize(switch, BRIDGE, name, mac, [ip], changed)
                converge.append(time.perf_counter() - started)
            for name, _, _ in members:
                port_profile.remove(switch, BRIDGE, name)
                switch.delete_port(BRIDGE, name)
            switch.delete_bridge(BRIDGE)
    finally:
        instance.stop()
        privileged.delete_namespace(namespace)
        shutil.rmtree(base, ignore_errors=True)
    return {"ports": ports, "runs": runs,
            "realize_one_port_median_s": statistics.median(one_port),
            "converge_change_median_s": statistics.median(converge),
            "realize_one_port_s": one_port, "converge_change_s": converge}


def command(runs: int = typer.Option(7, "--runs", min=1, max=100, help="Repetitions"),
            ports: int = typer.Option(50, "--ports", min=1, max=1000,
                                      help="Ports a change converges on")) -> None:
    """Median time to realize a profile on one port and to converge a change on N ports."""
    from vmferry.cli.common import errors_to_exit
    with errors_to_exit():
        result = run(runs, ports)
    one = result["realize_one_port_median_s"] * 1000
    many = result["converge_change_median_s"]
    typer.echo(f"realize a profile on one port: median {one:.1f} ms (target < 50 ms)")
    typer.echo(f"converge a change on {ports} ports: median {many:.2f} s (target < 2 s)")
