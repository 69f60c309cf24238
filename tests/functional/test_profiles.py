"""Issue 3: port profiles enforced on Open vSwitch, with real traffic through a lab.

One lab for the module. The real guest is the receiver for VLAN and ACL tests; "fake VM" veth
ports (tests/functional/profilekit.py), realized through the same code path, send what a guest
cannot be made to send: forged frames, floods, a measured stream.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from profilekit import BRIDGE, FakeVm, host_switch, snapshot, udp_stream_kbps, wait_until

from labkit import LabRun, default_topology, running_lab
from vmferry.drivers.softswitch.ovs import OvsSoftswitch

pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: lab namespaces")]

VM_IP = "192.0.2.10"
CLIENT_100 = "192.0.2.250"


def write_profiles(lab: LabRun, name: str, profiles: list[dict[str, Any]]) -> Path:
    path = lab.state_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(profiles))
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    # others may run this module at once
    name = f"tp{os.getpid() % 1000}"     # others may run this module at once
    with running_lab(tmp_path_factory.mktemp("state"), default_topology(name)) as run:
        yield run


@pytest.fixture(scope="module")
def switch1(lab: LabRun) -> Iterator[OvsSoftswitch]:
    with host_switch(lab.state_dir, lab.name, "host1") as switch:
        yield switch


@pytest.fixture(scope="module")
def web_vm(lab: LabRun) -> Iterator[str]:
    """A guest on host1 with profile "web": VLAN 100, TCP 8080 to it denied."""
    path = write_profiles(lab, "web", [{"name": "web", "vlan": 100, "acl": {"to_vm": {
        "rules": [{"action": "deny", "protocol": "tcp", "port": 8080}]}}}])
    lab.cli("profile", "apply", "-f", str(path))
    lab.cli("vm", "create", "pweb", "--host", "host1", "--profile", "web", "--ip",
            f"{VM_IP}/24", "--memory", "192")
    try:
        assert lab.wait_ping("client-100", VM_IP), "the guest must answer on VLAN 100"
        yield "pweb"
    finally:
        lab.cli("vm", "delete", "pweb", check=False)


def fake_vm(lab: LabRun, switch: OvsSoftswitch, name: str, index: int) -> FakeVm:
    """A fake VM on host1, VLAN 100 (the web_vm fixture keeps VLAN 100 on host1's uplink)."""
    vm = FakeVm(switch, lab.namespace("host1"), name, f"52:54:00:fe:00:{index:02x}",
                f"192.0.2.{60 + index}/24")
    vm.create()
    return vm


def test_vlan_isolation(lab: LabRun, web_vm: str) -> None:
    assert lab.pings("client-100", VM_IP)
    lab.exec("client-200", "ip", "addr", "add", "192.0.2.99/24", "dev", "eth0")
    try:
        assert not lab.pings("client-200", VM_IP, count=3), "VLAN 200 must not reach VLAN 100"
    finally:
        lab.exec("client-200", "ip", "addr", "del", "192.0.2.99/24", "dev", "eth0")


def test_acl_and_live_update(lab: LabRun, web_vm: str) -> None:
    page = lab.http("client-100", f"http://{VM_IP}/", timeout=5)
    assert page is not None and "port 80" in page
    assert lab.http("client-100", f"http://{VM_IP}:8080/", timeout=3) is None
    port = lab.json("port", "show", web_vm)
    assert port["match"] and port["actual"]["version"] == 1
    # Remove the rule live: same guest, no restart.
    pid_before = lab.json("vm", "show", web_vm)["runtime"].get("pid")
    path = write_profiles(lab, "web-open", [{"name": "web", "vlan": 100}])
    out = lab.json("profile", "apply", "-f", str(path))
    assert out[0]["version"] == 2 and out[0]["ports"][0]["ok"]
    assert out[0]["ports"][0]["version"] == 2
    page = lab.http("client-100", f"http://{VM_IP}:8080/", timeout=5)
    assert page is not None and "port 8080" in page
    assert lab.json("vm", "show", web_vm)["runtime"].get("pid") == pid_before
    port = lab.json("port", "show", web_vm)
    assert port["match"] and port["actual"]["version"] == 2 and port["realized"]["version"] == 2
    # Applying the same again changes nothing; deleting a used profile is refused (409).
    assert lab.json("profile", "apply", "-f", str(path))[0]["changed"] is False
    refused = lab.cli("profile", "delete", "web", check=False)
    assert refused.returncode == 2 and "used by" in refused.stderr


def test_bad_profile_refused_with_field_path_and_changes_nothing(lab: LabRun,
                                                                 switch1: OvsSoftswitch) -> None:
    before = lab.json("profile", "list")
    flows = switch1.dump_flows(BRIDGE)
    for bad, field in (({"name": "b", "vlan": 5000}, "vlan"),
                       ({"name": "b", "vlan": 1, "acl": {"to_vm": {"rules": [
                           {"action": "deny", "remote": "10.1.2/33"}]}}},
                        "acl.to_vm.rules[0].remote"),
                       ({"name": "b", "vlan": 1, "qos": {"to_vm": {"rate_kbps": 0}}},
                        "qos.to_vm.rate_kbps")):
        path = write_profiles(lab, "bad", [{"name": "ok1", "vlan": 100}, bad])
        result = lab.cli("profile", "apply", "-f", str(path), check=False)
        assert result.returncode == 2
        assert f"profiles[1].{field}" in result.stderr
    assert lab.json("profile", "list") == before
    assert switch1.dump_flows(BRIDGE) == flows


def test_anti_spoofing(lab: LabRun, switch1: OvsSoftswitch, web_vm: str) -> None:
    vm = fake_vm(lab, switch1, "sp", 1)
    try:
        vm.realize({"name": "guarded", "vlan": 100})
        assert wait_until(lambda: vm.pings(CLIENT_100, count=1) == 1, 10), "own MAC/IP passes"
        # Forged source IP: the client knows where the forged address lives, so only the
        # switch can stop the packets.
        vm.run("ip", "addr", "add", "192.0.2.71/24", "dev", "eth0")
        lab.exec("client-100", "ip", "neigh", "replace", "192.0.2.71", "lladdr", vm.mac,
                 "dev", "eth0", "nud", "permanent")
        try:
            assert vm.pings(CLIENT_100, count=3, source="192.0.2.71") == 0
        finally:
            lab.exec("client-100", "ip", "neigh", "del", "192.0.2.71", "dev", "eth0")
            vm.run("ip", "addr", "del", "192.0.2.71/24", "dev", "eth0")
        # Forged source MAC.
        vm.run("ip", "link", "set", "eth0", "address", "52:54:00:fe:00:99")
        lab.exec("client-100", "ip", "neigh", "flush", "dev", "eth0")
        assert vm.pings(CLIENT_100, count=3) == 0
        vm.run("ip", "link", "set", "eth0", "address", vm.mac)
        assert wait_until(lambda: vm.pings(CLIENT_100, count=1) == 1, 10)
    finally:
        vm.destroy()


def test_rate_limit_within_20_percent(lab: LabRun, switch1: OvsSoftswitch, web_vm: str) -> None:
    limit_kbps = 4000
    vm = fake_vm(lab, switch1, "rl", 2)
    try:
        vm.realize({"name": "slow", "vlan": 100, "qos": {"to_vm": {"rate_kbps": limit_kbps}}})
        assert wait_until(lambda: vm.pings(CLIENT_100, count=1) == 1, 10)
        received = udp_stream_kbps(lab.namespace("client-100"), vm.ns, vm.address,
                                   send_kbps=3 * limit_kbps, seconds=3)
        assert abs(received - limit_kbps) <= 0.2 * limit_kbps, received
        # And without the limit the same stream gets through at its own rate.
        vm.realize({"name": "fast", "vlan": 100})
        unlimited = udp_stream_kbps(lab.namespace("client-100"), vm.ns, vm.address,
                                    send_kbps=3 * limit_kbps, seconds=2)
        assert unlimited > 1.5 * limit_kbps, unlimited
    finally:
        vm.destroy()


def test_storm_control_caps_broadcast(lab: LabRun, switch1: OvsSoftswitch, web_vm: str) -> None:
    pps = 100
    vm = fake_vm(lab, switch1, "st", 3)
    try:
        vm.realize({"name": "calm", "vlan": 100, "storm_control": {"broadcast_pps": pps}})
        started = time.monotonic()
        sent = vm.arp_flood(CLIENT_100, frames=4000, seconds=2.0)
        elapsed = time.monotonic() - started
        stats = switch1.meter_stats(BRIDGE)
        meter = max((s for s in stats.values() if s.packets_in >= sent * 0.9),
                    key=lambda s: s.packets_in)
        passed = meter.packets_in - meter.band_packets
        assert sent >= 1000, sent
        # Passed: at most the rate over the time taken, plus the burst (rate/10) and slack.
        assert passed <= pps * elapsed * 1.2 + pps, (sent, passed, elapsed)
        assert passed >= pps * 0.5, (sent, passed)
    finally:
        vm.destroy()


def test_attach_then_detach_leaves_switch_identical(lab: LabRun) -> None:
    path = write_profiles(lab, "full", [{
        "name": "full", "vlan": 100,
        "acl": {"to_vm": {"default": "deny", "rules": [
            {"action": "allow", "protocol": "tcp", "port": "80-90"}]}},
        "qos": {"to_vm": {"rate_kbps": 10000}, "from_vm": {"rate_kbps": 10000}, "dscp": 10},
        "storm_control": {"broadcast_pps": 100, "multicast_pps": 100}}])
    lab.cli("profile", "apply", "-f", str(path))
    with host_switch(lab.state_dir, lab.name, "host2") as switch:
        before = snapshot(switch)
        lab.cli("vm", "create", "pfull", "--host", "host2", "--profile", "full", "--ip",
                "192.0.2.20/24", "--memory", "192")
        try:
            during = snapshot(switch)
            assert len(during[1]) > len(before[1]) and len(during[2]) == 4
            assert lab.json("port", "show", "pfull")["match"]
        finally:
            lab.cli("vm", "delete", "pfull")
        assert snapshot(switch) == before
    lab.cli("profile", "delete", "full")
