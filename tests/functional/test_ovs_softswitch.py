"""The OVS softswitch driver against real Open vSwitch daemons in network namespaces.

Lab (every namespace named ``vfovs-<run>-...``, every address RFC 5737)::

    c1 (192.0.2.1) --p-c1 [sw1 br0] tr-12 ==trunk 100,200== tr-21 [sw2 br0] p-c2 -- c2 (192.0.2.2)
       VLAN 100                                                     p-c3 -- c3 (192.0.2.3)
                                                                  VLAN 100 on p-c2, 200 on p-c3

Each switch is its own ``OvsInstance`` (ovsdb-server + ovs-vswitchd, netdev datapath) running in
its namespace. Traffic is ping only, bounded in count and time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmferry import privileged
from vmferry.drivers.softswitch.base import OWNER_KEY, Flow, Meter, PortSpec
from vmferry.drivers.softswitch.ovs import OvsSoftswitch, normalize_flow
from vmferry.errors import InputError, SoftswitchError, WaitTimeout
from vmferry.lab.ovs_instance import OvsInstance

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and Open vSwitch"),
    pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="Open vSwitch not installed"),
    pytest.mark.timeout(120),
]

RUN = f"{os.getpid() % 100000}"
BRIDGE = "br0"
COOKIE = 0x7F01
OTHER_COOKIE = 0x7F02
PING_DEADLINE = 8.0


def ns_name(role: str) -> str:
    return f"vfovs-{RUN}-{role}"


# ---- helpers -----------------------------------------------------------------------------------

def ping(src_ns: str, address: str, *, count: int = 3, interval: float = 0.2,
         deadline: float = 3.0, flood: bool = False) -> tuple[int, int]:
    """(transmitted, received) of a bounded ping from a namespace."""
    argv = ["ping", "-n", "-q", "-c", str(count), "-w", f"{deadline:g}", "-W", "1"]
    argv += ["-f"] if flood else ["-i", f"{interval:g}"]
    result = privileged.run_in_namespace(src_ns, [*argv, address], timeout=deadline + 5,
                                         check=False)
    found = re.search(r"(\d+) packets transmitted, (\d+) received", result.stdout)
    assert found, result.stdout + result.stderr
    return int(found.group(1)), int(found.group(2))


def reachable(src_ns: str, address: str, within: float = PING_DEADLINE) -> bool:
    """True as soon as one ping gets through, False if none does within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if ping(src_ns, address, count=1, deadline=1)[1] == 1:
            return True
    return False


def unreachable(src_ns: str, address: str) -> bool:
    """True if three pings over about a second all go unanswered."""
    return ping(src_ns, address, count=3, interval=0.3, deadline=2)[1] == 0


def cut_off(src_ns: str, address: str, settle: float = 2.0) -> bool:
    """True once pings stop: one fails within ``settle`` seconds, then three more all fail.

    The settle time covers ovs-vswitchd revalidating datapath flows cached before a change.
    """
    deadline = time.monotonic() + settle
    while ping(src_ns, address, count=1, deadline=1)[1] == 1:
        if time.monotonic() > deadline:
            return False
    return unreachable(src_ns, address)


def mac_of(namespace: str, ifname: str) -> str:
    result = privileged.run_in_namespace(namespace, ["cat", f"/sys/class/net/{ifname}/address"])
    return result.stdout.strip()


def row_versions(inst: OvsInstance, table: str) -> dict[str, str]:
    """name -> OVSDB _version of every row of a table (changes on every write to the row)."""
    query = ["Open_vSwitch", {"op": "select", "table": table, "where": [],
                              "columns": ["name", "_version"]}]
    result = subprocess.run(["ovsdb-client", "transact", f"unix:{inst.db_socket}",
                             json.dumps(query)],
                            capture_output=True, text=True, timeout=10, check=True)
    rows = json.loads(result.stdout)[0]["rows"]
    return {row["name"]: row["_version"][1] for row in rows}


def processes_under(path: Path) -> list[int]:
    """Pids of processes whose command line mentions ``path``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in cmdline:
            found.append(int(entry.name))
    return found


# ---- fixtures ----------------------------------------------------------------------------------

@dataclass
class Lab:
    root: Path
    namespaces: list[str] = field(default_factory=list)
    instances: dict[str, OvsInstance] = field(default_factory=dict)
    switches: dict[str, OvsSoftswitch] = field(default_factory=dict)

    @property
    def sw1(self) -> OvsSoftswitch:
        return self.switches["sw1"]

    @property
    def sw2(self) -> OvsSoftswitch:
        return self.switches["sw2"]

    def namespace(self, role: str) -> str:
        name = ns_name(role)
        self.namespaces.append(name)
        privileged.create_namespace(name)
        # No IPv6: its router solicitations and MLD reports would relearn MACs behind the
        # tests' backs and add frames to the counters.
        privileged.run_in_namespace(name, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                                           "net.ipv6.conf.default.disable_ipv6=1"])
        return name

    def switch(self, role: str) -> OvsSoftswitch:
        inst = OvsInstance(role, self.namespace(role), self.root / role)
        self.instances[role] = inst
        inst.start()
        self.switches[role] = inst.softswitch()
        self.switches[role].ensure_bridge(BRIDGE)
        return self.switches[role]

    def client(self, role: str, switch: str, port: str, vlan: int, cidr: str) -> None:
        privileged.create_veth(ns_name(switch), port, self.namespace(role), "eth0")
        privileged.add_address(ns_name(role), "eth0", cidr)
        self.switches[switch].ensure_port(BRIDGE, PortSpec(
            port, tag=vlan, vlan_mode="access", external_ids={OWNER_KEY: "test"}))

    def teardown(self) -> None:
        for switch in self.switches.values():
            switch.close()
        for inst in self.instances.values():
            inst.stop()
        for name in self.namespaces:
            privileged.delete_namespace(name)
        shutil.rmtree(self.root, ignore_errors=True)


def make_root() -> Path:
    # Short on purpose: unix socket paths are limited to 107 bytes.
    return Path(tempfile.mkdtemp(prefix="vfovs-", dir="/tmp"))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    built = Lab(make_root())
    try:
        sw1 = built.switch("sw1")
        sw2 = built.switch("sw2")
        privileged.create_veth(ns_name("sw1"), "tr-12", ns_name("sw2"), "tr-21")
        trunk = frozenset({100, 200})
        sw1.ensure_port(BRIDGE, PortSpec("tr-12", trunks=trunk, vlan_mode="trunk"))
        sw2.ensure_port(BRIDGE, PortSpec("tr-21", trunks=trunk, vlan_mode="trunk"))
        built.client("c1", "sw1", "p-c1", 100, "192.0.2.1/24")
        built.client("c2", "sw2", "p-c2", 100, "192.0.2.2/24")
        built.client("c3", "sw2", "p-c3", 200, "192.0.2.3/24")
        yield built
    finally:
        built.teardown()


@pytest.fixture
def lone_root() -> Iterator[Path]:
    """A base directory and a namespace for one instance, both removed afterwards."""
    root = make_root()
    privileged.create_namespace(ns_name("solo"))
    try:
        yield root
    finally:
        OvsInstance("solo", ns_name("solo"), root / "solo").stop()
        privileged.delete_namespace(ns_name("solo"))
        shutil.rmtree(root, ignore_errors=True)


# ---- forwarding and VLANs ----------------------------------------------------------------------

def test_each_switch_has_its_own_ports(lab: Lab) -> None:
    assert sorted(lab.sw1.ports(BRIDGE)) == ["p-c1", "tr-12"]
    assert sorted(lab.sw2.ports(BRIDGE)) == ["p-c2", "p-c3", "tr-21"]
    state = lab.sw2.ports(BRIDGE)["p-c3"]
    assert (state.tag, state.vlan_mode, state.external_ids) == (200, "access",
                                                                {OWNER_KEY: "test"})
    assert state.ofport is not None and state.ofport > 0
    assert lab.sw1.ports(BRIDGE)["tr-12"].trunks == frozenset({100, 200})


def test_same_vlan_across_the_trunk_forwards_other_vlan_does_not(lab: Lab) -> None:
    assert reachable(ns_name("c1"), "192.0.2.2")
    assert unreachable(ns_name("c1"), "192.0.2.3")


def test_removing_the_vlan_from_the_trunk_cuts_and_restoring_heals(lab: Lab) -> None:
    assert reachable(ns_name("c1"), "192.0.2.2")
    try:
        lab.sw1.set_trunks(BRIDGE, "tr-12", frozenset({200}))
        assert lab.sw1.ports(BRIDGE)["tr-12"].trunks == frozenset({200})
        assert cut_off(ns_name("c1"), "192.0.2.2")
    finally:
        lab.sw1.set_trunks(BRIDGE, "tr-12", frozenset({100, 200}))
    # How fast it heals is a benchmark figure (vmferry bench profiles: switch.trunk_heal_s).
    assert reachable(ns_name("c1"), "192.0.2.2")


def test_set_trunks_unchanged_writes_nothing(lab: Lab) -> None:
    before = lab.sw1.write_transactions
    lab.sw1.set_trunks(BRIDGE, "tr-12", frozenset({100, 200}))
    assert lab.sw1.write_transactions == before


TCP_SINK = """
import socket
server = socket.create_server(("192.0.2.2", 5001))
server.settimeout(8)
conn, _ = server.accept()
conn.settimeout(8)
total = 0
while chunk := conn.recv(65536):
    total += len(chunk)
print(total)
"""
TCP_SOURCE = """
import socket, sys, time
deadline = time.monotonic() + 5
while True:
    try:
        conn = socket.create_connection(("192.0.2.2", 5001), timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
conn.sendall(b"x" * int(sys.argv[1]))
conn.close()
"""
UDP_SINK = """
import socket
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("192.0.2.2", 5002))
sock.settimeout(5)
print(sock.recv(2048).decode())
"""
UDP_SOURCE = """
import socket
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"hello", ("192.0.2.2", 5002))
"""


def test_tcp_and_udp_cross_the_trunk(lab: Lab) -> None:
    # Veths keep checksum offload on: this only works with userspace TSO, which OvsInstance
    # turns on (without it the netdev datapath forwards unfinished checksums).
    size = 4 * 1024 * 1024
    assert reachable(ns_name("c1"), "192.0.2.2")
    sink = subprocess.Popen(privileged.netns_argv(ns_name("c2"), [sys.executable, "-c", TCP_SINK]),
                            stdout=subprocess.PIPE, text=True)
    try:
        privileged.run_in_namespace(ns_name("c1"), [sys.executable, "-c", TCP_SOURCE, str(size)],
                                    timeout=15)
        out, _ = sink.communicate(timeout=15)
    finally:
        if sink.poll() is None:
            privileged.stop_pid(sink.pid)
    assert int(out) == size

    sink = subprocess.Popen(privileged.netns_argv(ns_name("c2"), [sys.executable, "-c", UDP_SINK]),
                            stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 5
        while sink.poll() is None and time.monotonic() < deadline:
            privileged.run_in_namespace(ns_name("c1"), [sys.executable, "-c", UDP_SOURCE],
                                        timeout=5)
            time.sleep(0.2)
        out, _ = sink.communicate(timeout=10)
    finally:
        if sink.poll() is None:
            privileged.stop_pid(sink.pid)
    assert out.strip() == "hello"


# ---- ports -------------------------------------------------------------------------------------

def test_ensure_port_twice_writes_nothing_the_second_time(lab: Lab) -> None:
    spec = PortSpec("p-c1", tag=100, vlan_mode="access", external_ids={OWNER_KEY: "test"})
    ports_before = row_versions(lab.instances["sw1"], "Port")
    ifaces_before = row_versions(lab.instances["sw1"], "Interface")
    writes = lab.sw1.write_transactions
    lab.sw1.ensure_port(BRIDGE, spec)
    lab.sw1.ensure_port(BRIDGE, spec)
    assert lab.sw1.write_transactions == writes
    assert row_versions(lab.instances["sw1"], "Port") == ports_before
    assert row_versions(lab.instances["sw1"], "Interface")["p-c1"] == ifaces_before["p-c1"]


def test_ensure_port_writes_only_the_changed_row(lab: Lab) -> None:
    spec = PortSpec("p-c1", tag=100, vlan_mode="access", external_ids={OWNER_KEY: "test"})
    changed = PortSpec("p-c1", tag=100, vlan_mode="access",
                       external_ids={OWNER_KEY: "test", "note": "x"}, iface_type="")
    ports_before = row_versions(lab.instances["sw1"], "Port")
    try:
        writes = lab.sw1.write_transactions
        lab.sw1.ensure_port(BRIDGE, changed)
        assert lab.sw1.write_transactions == writes + 1
        ports_after = row_versions(lab.instances["sw1"], "Port")
        assert ports_after["p-c1"] != ports_before["p-c1"]
        assert ports_after["tr-12"] == ports_before["tr-12"]
        assert lab.sw1.ports(BRIDGE)["p-c1"].external_ids == {OWNER_KEY: "test", "note": "x"}
    finally:
        lab.sw1.ensure_port(BRIDGE, spec)
    assert lab.sw1.ports(BRIDGE)["p-c1"].external_ids == {OWNER_KEY: "test"}


def test_port_for_a_missing_device_fails_then_comes_up_when_it_appears(lab: Lab) -> None:
    sw1_ns = ns_name("sw1")
    spec = PortSpec("late0", tag=300, external_ids={OWNER_KEY: "test"})
    try:
        with pytest.raises(SoftswitchError) as info:
            lab.sw1.ensure_port(BRIDGE, spec)
        assert "late0" in info.value.message
        assert lab.sw1.ports(BRIDGE)["late0"].ofport == -1
        with pytest.raises(SoftswitchError):
            lab.sw1.wait_for_port(BRIDGE, "late0", timeout=2)
        privileged.create_tap(sw1_ns, "late0")
        # ovs-vswitchd notices the new device by itself and numbers the port: an OVSDB event.
        ofport = lab.sw1.wait_for_port(BRIDGE, "late0", timeout=10)
        assert ofport > 0
    finally:
        lab.sw1.delete_port(BRIDGE, "late0")
        privileged.delete_link(sw1_ns, "late0")


def test_wait_for_a_port_that_never_comes_times_out(lab: Lab) -> None:
    # How long it takes to give up is a benchmark figure (switch.wait_timeout_s).
    with pytest.raises(WaitTimeout) as info:
        lab.sw1.wait_for_port(BRIDGE, "never0", timeout=0.5)
    assert "never0" in info.value.message and info.value.fields["seconds"] == 0.5


def test_delete_port_is_idempotent(lab: Lab) -> None:
    sw1_ns = ns_name("sw1")
    privileged.create_tap(sw1_ns, "tap-del")
    try:
        lab.sw1.ensure_port(BRIDGE, PortSpec("tap-del", tag=100))
        assert lab.sw1.wait_for_port(BRIDGE, "tap-del", timeout=5) > 0
        lab.sw1.delete_port(BRIDGE, "tap-del")
        assert "tap-del" not in lab.sw1.ports(BRIDGE)
        writes = lab.sw1.write_transactions
        lab.sw1.delete_port(BRIDGE, "tap-del")
        assert lab.sw1.write_transactions == writes
    finally:
        lab.sw1.delete_port(BRIDGE, "tap-del")
        privileged.delete_link(sw1_ns, "tap-del")


def test_a_new_access_port_forwards(lab: Lab) -> None:
    c4 = lab.namespace("c4")
    try:
        privileged.create_veth(ns_name("sw1"), "p-c4", c4, "eth0")
        privileged.add_address(c4, "eth0", "192.0.2.4/24")
        lab.sw1.ensure_port(BRIDGE, PortSpec("p-c4", tag=100, vlan_mode="access"))
        # How fast it forwards is a benchmark figure (switch.port_forwarding_s).
        assert reachable(c4, "192.0.2.2")
    finally:
        lab.sw1.delete_port(BRIDGE, "p-c4")
        privileged.delete_namespace(c4)


# ---- flows -------------------------------------------------------------------------------------

def test_replace_and_dump_round_trip_leaves_other_cookies_alone(lab: Lab) -> None:
    sw = lab.sw1
    others = [Flow(0, 50, "arp,arp_tpa=198.51.100.9", "drop")]
    first = [Flow(0, 60, "dl_type=0x0800,nw_dst=203.0.113.0/255.255.255.0", "drop"),
             Flow(0, 61, "ip,nw_proto=6,tp_dst=0x16", "normal"),
             Flow(1, 10, "", "NORMAL")]
    second = [Flow(0, 60, "ip,nw_dst=203.0.113.0/24", "drop"),
              Flow(0, 62, "udp,udp_dst=53", "drop")]
    before_all = sw.dump_flows(BRIDGE)
    try:
        sw.replace_flows(BRIDGE, OTHER_COOKIE, others)
        sw.replace_flows(BRIDGE, COOKIE, first)
        assert sw.dump_flows(BRIDGE, COOKIE) == sorted(
            (normalize_flow(f) for f in first), key=lambda f: (f.table, -f.priority, f.match))
        sw.replace_flows(BRIDGE, COOKIE, second)
        assert set(sw.dump_flows(BRIDGE, COOKIE)) == {normalize_flow(f) for f in second}
        assert sw.dump_flows(BRIDGE, OTHER_COOKIE) == [normalize_flow(f) for f in others]
        # same flows again: nothing to send, counters survive
        sw.replace_flows(BRIDGE, COOKIE, list(reversed(second)))
        assert set(sw.dump_flows(BRIDGE, COOKIE)) == {normalize_flow(f) for f in second}
        sw.replace_flows(BRIDGE, COOKIE, [])
        assert sw.dump_flows(BRIDGE, COOKIE) == []
        assert sw.dump_flows(BRIDGE, OTHER_COOKIE) == [normalize_flow(f) for f in others]
    finally:
        sw.replace_flows(BRIDGE, COOKIE, [])
        sw.replace_flows(BRIDGE, OTHER_COOKIE, [])
    assert sw.dump_flows(BRIDGE) == before_all


def test_a_rejected_flow_changes_nothing(lab: Lab) -> None:
    sw = lab.sw1
    sw.replace_flows(BRIDGE, COOKIE, [Flow(0, 60, "ip", "NORMAL")])
    try:
        with pytest.raises(SoftswitchError):
            sw.replace_flows(BRIDGE, COOKIE, [Flow(0, 70, "ip", "meter:999,NORMAL"),
                                              Flow(0, 71, "arp", "drop")])
        # the bundle is all or nothing
        assert sw.dump_flows(BRIDGE, COOKIE) == [Flow(0, 60, "ip", "NORMAL")]
    finally:
        sw.replace_flows(BRIDGE, COOKIE, [])


def test_replace_flows_many_replaces_every_cookie_in_one_bundle(lab: Lab) -> None:
    sw = lab.sw1
    third = OTHER_COOKIE + 1
    before_all = sw.dump_flows(BRIDGE)
    untouched = [Flow(0, 50, "arp,arp_tpa=198.51.100.9", "drop")]
    try:
        sw.replace_flows(BRIDGE, third, untouched)
        sw.replace_flows_many(BRIDGE, {COOKIE: [Flow(0, 60, "ip,nw_dst=203.0.113.1", "drop")],
                                       OTHER_COOKIE: [Flow(0, 61, "udp,tp_dst=53", "drop")]})
        sw.replace_flows_many(BRIDGE, {COOKIE: [Flow(0, 60, "ip,nw_dst=203.0.113.2", "drop")],
                                       OTHER_COOKIE: []})
        assert sw.dump_flows(BRIDGE, COOKIE) == [Flow(0, 60, "ip,nw_dst=203.0.113.2", "drop")]
        assert sw.dump_flows(BRIDGE, OTHER_COOKIE) == []
        assert sw.dump_flows(BRIDGE, third) == [normalize_flow(f) for f in untouched]
        # One bundle for all cookies: a flow OVS refuses for one changes none of them.
        with pytest.raises(SoftswitchError):
            sw.replace_flows_many(BRIDGE, {
                COOKIE: [Flow(0, 62, "arp", "drop")],
                OTHER_COOKIE: [Flow(0, 70, "ip", "meter:999,NORMAL")]})
        assert sw.dump_flows(BRIDGE, COOKIE) == [Flow(0, 60, "ip,nw_dst=203.0.113.2", "drop")]
        assert sw.dump_flows(BRIDGE, OTHER_COOKIE) == []
    finally:
        sw.replace_flows_many(BRIDGE, {COOKIE: [], OTHER_COOKIE: [], third: []})
    assert sw.dump_flows(BRIDGE) == before_all


def test_a_flow_naming_a_port_by_name_is_refused(lab: Lab) -> None:
    with pytest.raises(SoftswitchError):
        lab.sw1.replace_flows(BRIDGE, COOKIE, [Flow(0, 60, "in_port=p-c1", "drop")])
    assert lab.sw1.dump_flows(BRIDGE, COOKIE) == []


def test_replace_meters_returns_what_the_next_call_needs(lab: Lab) -> None:
    sw = lab.sw1
    try:
        now = sw.replace_meters(BRIDGE, [Meter(11, kbps=1000), Meter(12, pktps=50, burst=5)],
                                {11, 12})
        assert now == sw.dump_meters(BRIDGE)
        now = sw.replace_meters(BRIDGE, [Meter(12, pktps=60, burst=5)], {11, 12}, actual=now)
        assert now == sw.dump_meters(BRIDGE) == [Meter(12, pktps=60, burst=5)]
    finally:
        sw.replace_meters(BRIDGE, [], {11, 12})
    assert sw.dump_meters(BRIDGE) == []


def test_ensure_ports_is_one_transaction_and_waits_only_when_vswitchd_acts(lab: Lab) -> None:
    sw = lab.sw1
    sw1_ns = ns_name("sw1")

    def next_cfg() -> int:
        query = ["Open_vSwitch", {"op": "select", "table": "Open_vSwitch", "where": [],
                                  "columns": ["next_cfg", "cur_cfg"]}]
        result = subprocess.run(["ovsdb-client", "transact",
                                 f"unix:{lab.instances['sw1'].db_socket}", json.dumps(query)],
                                capture_output=True, text=True, timeout=10, check=True)
        row = json.loads(result.stdout)[0]["rows"][0]
        assert row["cur_cfg"] == row["next_cfg"]
        return int(row["next_cfg"])

    names = ["tap-m1", "tap-m2", "tap-m3"]
    specs = [PortSpec(n, tag=100, vlan_mode="access", external_ids={OWNER_KEY: "m"})
             for n in names]
    for name in names:
        privileged.create_tap(sw1_ns, name)
    try:
        writes, cfg = sw.write_transactions, next_cfg()
        sw.ensure_ports(BRIDGE, specs)
        assert sw.write_transactions == writes + 1
        assert next_cfg() == cfg + 1                 # waited for ovs-vswitchd
        assert all((sw.ports(BRIDGE)[n].ofport or 0) > 0 for n in names)
        tagged = [PortSpec(s.name, tag=100, vlan_mode="access",
                           external_ids={OWNER_KEY: "m", "note": "x"}) for s in specs]
        sw.ensure_ports(BRIDGE, tagged)
        assert sw.write_transactions == writes + 2
        assert next_cfg() == cfg + 1                 # external_ids only: no wait
        assert all(sw.ports(BRIDGE)[n].external_ids["note"] == "x" for n in names)
        moved = [PortSpec(s.name, tag=200, vlan_mode="access",
                          external_ids={OWNER_KEY: "m"}) for s in specs]
        sw.ensure_ports(BRIDGE, moved)
        assert next_cfg() == cfg + 2                 # a VLAN: ovs-vswitchd acts on it
        with pytest.raises(InputError):
            sw.ensure_ports(BRIDGE, [specs[0], specs[0]])
    finally:
        for name in names:
            sw.delete_port(BRIDGE, name)
            privileged.delete_link(sw1_ns, name)


def test_a_drop_flow_drops_ping(lab: Lab) -> None:
    sw = lab.sw1
    c1_port = sw.ports(BRIDGE)["p-c1"].ofport
    assert reachable(ns_name("c1"), "192.0.2.2")
    try:
        sw.replace_flows(BRIDGE, COOKIE, [Flow(0, 200, f"icmp,in_port={c1_port}", "drop")])
        assert cut_off(ns_name("c1"), "192.0.2.2")
        counters = sw.flow_stats(BRIDGE, COOKIE)
        assert len(counters) == 1 and counters[0].packets >= 3
    finally:
        sw.replace_flows(BRIDGE, COOKIE, [])
    assert reachable(ns_name("c1"), "192.0.2.2")


def test_a_pktps_meter_caps_a_ping_flood(lab: Lab) -> None:
    sw = lab.sw1
    rate, burst, seconds = 20, 10, 3
    assert reachable(ns_name("c1"), "192.0.2.2")
    try:
        sw.replace_meters(BRIDGE, [Meter(1, pktps=rate, burst=burst)], {1})
        assert sw.dump_meters(BRIDGE) == [Meter(1, pktps=rate, burst=burst)]
        sw.replace_flows(BRIDGE, COOKIE, [
            Flow(0, 200, "icmp,nw_src=192.0.2.1,nw_dst=192.0.2.2", "meter:1,NORMAL")])
        sw.settle()                     # no echo request may still take a cached, unmetered path
        # A flood sends at least 100/s (more while replies come back): 400 requests in ~4 s.
        sent, received = ping(ns_name("c1"), "192.0.2.2", count=400, deadline=seconds + 1,
                              flood=True)
        print(f"flood: sent {sent}, received {received}, meter {rate} pkt/s burst {burst}")
        assert sent >= 200
        assert received <= rate * (seconds + 1) + burst + 10
        assert received > 0
        # A request or two may still be in a queue when ping gives up: counters may trail.
        stats = sw.meter_stats(BRIDGE)[1]
        assert stats.band_packets >= sent - received - 5
        assert stats.packets_in >= sent - 3
        (flow,) = sw.flow_stats(BRIDGE, COOKIE)
        assert flow.packets >= sent - 3
    finally:
        sw.replace_flows(BRIDGE, COOKIE, [])
        sw.replace_meters(BRIDGE, [], {1})
    assert sw.dump_meters(BRIDGE) == []


def test_attach_then_detach_leaves_the_switch_as_it_was(lab: Lab) -> None:
    sw = lab.sw1
    sw1_ns = ns_name("sw1")
    before = (sw.ports(BRIDGE), sw.dump_flows(BRIDGE), sw.dump_meters(BRIDGE))
    privileged.create_tap(sw1_ns, "tap-vm1")
    try:
        # attach: port, then meters, then the flows that use them
        sw.ensure_port(BRIDGE, PortSpec("tap-vm1", tag=100, vlan_mode="access",
                                        external_ids={OWNER_KEY: "vm1"}))
        ofport = sw.wait_for_port(BRIDGE, "tap-vm1", timeout=5)
        sw.replace_meters(BRIDGE, [Meter(7, kbps=10_000, burst=1_000), Meter(8, pktps=100)],
                          {7, 8})
        sw.replace_flows(BRIDGE, COOKIE, [
            Flow(0, 150, f"in_port={ofport},dl_src=52:54:00:00:00:01", "meter:7,NORMAL"),
            Flow(0, 151, f"in_port={ofport},arp", "meter:8,NORMAL"),
            Flow(0, 140, f"in_port={ofport}", "drop"),
        ])
        assert "tap-vm1" in sw.ports(BRIDGE)
        assert len(sw.dump_flows(BRIDGE, COOKIE)) == 3
        assert {m.meter_id for m in sw.dump_meters(BRIDGE)} == {7, 8}
    finally:
        # detach in reverse
        sw.replace_flows(BRIDGE, COOKIE, [])
        sw.replace_meters(BRIDGE, [], {7, 8})
        sw.delete_port(BRIDGE, "tap-vm1")
        privileged.delete_link(sw1_ns, "tap-vm1")
    assert (sw.ports(BRIDGE), sw.dump_flows(BRIDGE), sw.dump_meters(BRIDGE)) == before


# ---- fdb ---------------------------------------------------------------------------------------

def test_flush_fdb_forgets_learned_macs(lab: Lab) -> None:
    sw = lab.sw1
    # A quiet pair of its own, VLAN 300, with static ARP: no ARP probe can relearn a MAC
    # between the flush and the look.
    c5, c6 = "c5", "c6"
    try:
        lab.client(c5, "sw1", "p-c5", 300, "198.51.100.5/24")
        lab.client(c6, "sw1", "p-c6", 300, "198.51.100.6/24")
        macs = {role: mac_of(ns_name(role), "eth0") for role in (c5, c6)}
        for role, peer, address in ((c5, c6, "198.51.100.6"), (c6, c5, "198.51.100.5")):
            privileged.run_in_namespace(ns_name(role), [
                "ip", "neigh", "replace", address, "lladdr", macs[peer], "dev", "eth0",
                "nud", "permanent"])
        assert reachable(ns_name(c5), "198.51.100.6")
        assert {macs[c5], macs[c6]} <= {mac for _, vlan, mac in sw.fdb(BRIDGE) if vlan == 300}

        sw.flush_fdb(BRIDGE, "52:54:00:ff:ff:fe")       # not learned: nothing to do
        assert {macs[c5], macs[c6]} <= {mac for _, vlan, mac in sw.fdb(BRIDGE) if vlan == 300}
        # OVS 3.1 cannot forget one dynamic entry: asking for one MAC flushes the bridge.
        sw.flush_fdb(BRIDGE, macs[c5])
        assert not [mac for _, vlan, mac in sw.fdb(BRIDGE) if vlan == 300]

        assert reachable(ns_name(c5), "198.51.100.6")
        sw.flush_fdb(BRIDGE)
        assert not [mac for _, vlan, mac in sw.fdb(BRIDGE) if vlan == 300]
    finally:
        for role in (c5, c6):
            sw.delete_port(BRIDGE, f"p-{role}")
            privileged.delete_namespace(ns_name(role))


# ---- instance lifecycle ------------------------------------------------------------------------

def test_instance_survives_its_starter_and_stop_leaves_nothing(lone_root: Path) -> None:
    base = lone_root / "solo"
    # Start from another process that exits: the daemons are detached and outlive it.
    starter = ("from pathlib import Path; from vmferry.lab.ovs_instance import "
               f"OvsInstance; OvsInstance('solo', {ns_name('solo')!r}, Path({str(base)!r}))"
               ".start()")
    subprocess.run([sys.executable, "-c", starter], check=True, timeout=30)
    inst = OvsInstance("solo", ns_name("solo"), base)
    assert inst.running()
    pids = inst.pids()
    inst.start()                        # already running: no-op
    assert inst.pids() == pids
    threads = threading.active_count()
    with inst.softswitch() as sw:
        sw.ensure_bridge("br-solo")
        assert sw.bridges() == ["br-solo"]
        assert (base / "br-solo.mgmt").exists()
    assert threading.active_count() == threads     # close() ended the OVSDB threads
    inst.stop()
    assert not inst.running()
    assert not any(privileged.pid_alive(pid) for pid in pids.values())
    assert processes_under(base) == []
    assert not base.exists()
    inst.stop()                         # idempotent


def test_restart_keeps_the_database(lone_root: Path) -> None:
    inst = OvsInstance("solo", ns_name("solo"), lone_root / "solo")
    inst.start()
    with inst.softswitch() as sw:
        sw.ensure_bridge("br-keep", fail_mode="secure")
    pid = inst.pids()["ovs-vswitchd"]
    privileged.stop_pid(pid)            # half-running: start() must recover
    assert not inst.running()
    inst.start()
    with inst.softswitch() as sw:
        assert sw.bridges() == ["br-keep"]
        writes = sw.write_transactions
        sw.ensure_bridge("br-keep", fail_mode="secure")
        assert sw.write_transactions == writes
        sw.ensure_bridge("br-keep")                     # back to the default fail mode
        assert sw.write_transactions == writes + 1
        sw.delete_bridge("br-keep")
        sw.delete_bridge("br-keep")
        assert sw.write_transactions == writes + 2
        assert sw.bridges() == []
        assert not (lone_root / "solo" / "br-keep.mgmt").exists()
    inst.stop()
