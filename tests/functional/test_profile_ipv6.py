"""Issue 12: IPv6 port security of a profile, with real frames through a real Open vSwitch.

Lab: a private OVS (netdev datapath) in a namespace of its own, bridge ``br-vm``, two fake VMs
(tests/functional/profilekit.py) on VLAN 100::

    guard (profiled, 2001:db8:76::71) --fk-g6 [br-vm] fk-v6-- victim (no profile, ::72)

The guarded VM sends hand-made frames (AF_PACKET, inside its own namespace): a rogue router
advertisement, neighbour advertisements for the victim's address (NA spoofing) and for its
own address with another MAC, an echo from a link-local address its MAC does not give, and
the same kinds of frames done right as controls. A capture in the victim's namespace counts
what arrives. Real neighbour discovery (ping between the two, by global and link-local
address) must keep working. Addresses are from 2001:db8::/32 (RFC 3849).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from profilekit import BRIDGE, FakeVm, wait_until

from vmferry import privileged
from vmferry.drivers.softswitch.ovs import profile as port_profile
from vmferry.drivers.softswitch.ovs.profile_flows import link_local
from vmferry.lab.ovs_instance import OvsInstance
from vmferry.model.profile import parse_profile

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces and Open vSwitch"),
    pytest.mark.skipif(shutil.which("ovs-vswitchd") is None, reason="Open vSwitch not installed"),
    pytest.mark.timeout(180),
]

GUARD_V6 = "2001:db8:76::71"
VICTIM_V6 = "2001:db8:76::72"
ROGUE_PREFIX = "2001:db8:bad::"
FOREIGN_MAC = "52:54:00:fe:66:99"

# Runs in a namespace: builds and sends the frames named on the command line.
SENDER = r"""
import json, socket, struct, sys
mac_text, src_ll, kinds = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
mac = bytes.fromhex(mac_text.replace(":", ""))
def ip6(text): return socket.inet_pton(socket.AF_INET6, text)
def checksum(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
def frame(src, dst, dst_mac, icmp):
    pseudo = ip6(src) + ip6(dst) + struct.pack("!I3xB", len(icmp), 58)
    icmp = icmp[:2] + struct.pack("!H", checksum(pseudo + icmp)) + icmp[4:]
    header = struct.pack("!IHBB", 6 << 28, len(icmp), 58, 255) + ip6(src) + ip6(dst)
    return dst_mac + mac + b"\x86\xdd" + header + icmp
def router_advert(prefix):
    body = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    body += struct.pack("!BB", 1, 1) + mac
    body += struct.pack("!BBBBIII", 3, 4, 64, 0xC0, 86400, 14400, 0) + ip6(prefix)
    return body
def neighbor_advert(target, tll):
    return (struct.pack("!BBHI", 136, 0, 0, 0x20000000) + ip6(target)
            + struct.pack("!BB", 2, 1) + bytes.fromhex(tll.replace(":", "")))
def echo(marker):
    return struct.pack("!BBHHH", 128, 0, 0, 0x7666, 1) + marker.encode()
all_nodes = bytes.fromhex("333300000001")
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for kind in kinds:
    name, args = kind[0], kind[1:]
    if name == "ra":
        packet = frame(src_ll, "ff02::1", all_nodes, router_advert(args[0]))
    elif name == "na":
        packet = frame(args[2], "ff02::1", all_nodes, neighbor_advert(args[0], args[1]))
    else:   # echo from args[0] to args[1] at MAC args[2], marked args[3]
        packet = frame(args[0], args[1], bytes.fromhex(args[2].replace(":", "")), echo(args[3]))
    for _ in range(3):
        s.send(packet)
print("sent")
"""

# Runs in a namespace: counts the ICMPv6 frames it sees, by kind, for a few seconds.
CAPTURE = r"""
import json, socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
s.bind(("eth0", 0))
s.settimeout(0.2)
seen = {}
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        data = s.recv(2048)
    except socket.timeout:
        continue
    if len(data) < 62 or data[12:14] != b"\x86\xdd" or data[20] != 58:
        continue
    kind = data[54]
    if kind == 134:
        # 16 bytes of RA, 8 of source link-layer option, 16 of prefix option before its prefix
        key = "ra " + socket.inet_ntop(socket.AF_INET6, data[94:110]) \
            if len(data) >= 110 else "ra"
    elif kind == 136:
        key = ("na " + socket.inet_ntop(socket.AF_INET6, data[62:78]) + " "
               + data[80:86].hex(":"))
    elif kind == 128:
        key = "echo " + data[62:].decode(errors="replace")
    else:
        continue
    seen[key] = seen.get(key, 0) + 1
print(json.dumps(seen), flush=True)
"""


def run_py(ns: str, script: str, *args: str, timeout: float = 20) -> str:
    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
                            capture_output=True, text=True, timeout=timeout, check=True)
    return result.stdout


def sent_and_seen(guard: FakeVm, victim: FakeVm, kinds: list[list[str]]) -> dict[str, int]:
    """Send ``kinds`` of frames from the guarded VM; what the victim's capture counted."""
    capture = subprocess.Popen(["ip", "netns", "exec", victim.ns, sys.executable, "-c",
                                CAPTURE, "2.0"], stdout=subprocess.PIPE, text=True)
    try:
        assert capture.stdout is not None
        assert capture.stdout.readline().strip() == "ready"
        assert run_py(guard.ns, SENDER, guard.mac, link_local(guard.mac),
                      json.dumps(kinds)).strip() == "sent"
        out, _ = capture.communicate(timeout=15)
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.wait(timeout=5)
    seen: dict[str, int] = json.loads(out)
    return seen


def realize(guard: FakeVm, **security: Any) -> None:
    profile = parse_profile({"name": "v6guard", "version": 1, "vlan": 100,
                             "security": security})
    port_profile.realize(guard.switch, BRIDGE, guard.port, guard.mac,
                         [guard.ip, f"{GUARD_V6}/64"], profile)


def addresses_ready(vm: FakeVm) -> bool:
    """The VM's IPv6 addresses have passed duplicate address detection."""
    shown = vm.run("ip", "-6", "addr", "show", "dev", "eth0").stdout
    return "fe80::" in shown and "tentative" not in shown


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[FakeVm, FakeVm]]:
    root = Path(tempfile.mkdtemp(prefix="vfv6-", dir="/tmp"))
    switch_ns = f"vfv6-{os.getpid() % 100000}-sw"
    privileged.create_namespace(switch_ns)
    instance = OvsInstance("v6", switch_ns, root / "sw")
    vms: list[FakeVm] = []
    try:
        instance.start()
        with instance.softswitch() as switch:
            switch.ensure_bridge(BRIDGE)
            for name, index, v6 in (("g6", 0x71, GUARD_V6), ("v6", 0x72, VICTIM_V6)):
                vm = FakeVm(switch, switch_ns, name, f"52:54:00:76:00:{index:02x}",
                            f"192.0.2.{index}/24")
                vms.append(vm)
                vm.create()
                # The veth came up with a random MAC: cycle the link so its link-local
                # address is the EUI-64 of the VM's MAC.
                vm.run("ip", "link", "set", "eth0", "down")
                vm.run("ip", "link", "set", "eth0", "up")
                vm.run("ip", "-6", "addr", "add", f"{v6}/64", "dev", "eth0")
            guard, victim = vms
            realize(guard)
            assert wait_until(lambda: all(addresses_ready(vm) for vm in vms), 15), \
                "IPv6 addresses must pass duplicate address detection"
            yield guard, victim
            for vm in vms:
                vm.destroy()
            vms.clear()
    finally:
        for vm in vms:
            privileged.delete_link(switch_ns, vm.port)
            privileged.delete_namespace(vm.ns)
        instance.stop()
        privileged.delete_namespace(switch_ns)
        shutil.rmtree(root, ignore_errors=True)


def test_the_realized_flows_match_what_the_profile_asks(pair: tuple[FakeVm, FakeVm]) -> None:
    guard, _ = pair
    profile = parse_profile({"name": "v6guard", "version": 1, "vlan": 100})
    status = port_profile.port_status(guard.switch, BRIDGE, guard.port, guard.mac,
                                      [guard.ip, GUARD_V6], profile)
    assert status["match"], (status["missing_flows"], status["extra_flows"])


def test_legitimate_neighbor_discovery_still_works(pair: tuple[FakeVm, FakeVm]) -> None:
    guard, victim = pair
    assert guard.pings(VICTIM_V6) > 0, "global address: NS/NA from the VM's own addresses"
    assert victim.pings(GUARD_V6) > 0
    assert guard.pings(f"{link_local(victim.mac)}%eth0") > 0, "link-local, from its EUI-64"
    neighbours = victim.run("ip", "-6", "neigh", "show", GUARD_V6).stdout
    assert guard.mac in neighbours


def test_rogue_ra_and_spoofed_na_do_not_reach_another_port(pair: tuple[FakeVm, FakeVm]) -> None:
    guard, victim = pair
    own_ll = link_local(guard.mac)
    seen = sent_and_seen(guard, victim, [
        ["ra", ROGUE_PREFIX],
        ["na", VICTIM_V6, guard.mac, own_ll],              # NA spoofing: the victim's address
        ["na", "2001:db8:76::1", guard.mac, own_ll],       # ... or a router's
        ["na", GUARD_V6, FOREIGN_MAC, own_ll],             # its own address, another MAC
        ["na", GUARD_V6, guard.mac, own_ll],               # control: its own, its MAC
        ["echo", "fe80::dead", link_local(victim.mac), victim.mac, "forged-ll"],
        ["echo", own_ll, link_local(victim.mac), victim.mac, "own-ll"],       # control
    ])
    assert seen.get(f"na {GUARD_V6} {guard.mac}", 0) >= 1, f"controls must arrive: {seen}"
    assert seen.get("echo own-ll", 0) >= 1, f"controls must arrive: {seen}"
    assert not any(key.startswith("ra") for key in seen), seen
    assert f"na {VICTIM_V6} {guard.mac}" not in seen
    assert f"na 2001:db8:76::1 {guard.mac}" not in seen
    assert f"na {GUARD_V6} {FOREIGN_MAC}" not in seen
    assert "echo forged-ll" not in seen
    # Nor did the kernel behind the victim's port act on them.
    assert ROGUE_PREFIX.rstrip(":") not in victim.run("ip", "-6", "addr").stdout
    assert FOREIGN_MAC not in victim.run("ip", "-6", "neigh").stdout


def test_a_profile_that_allows_them_lets_them_through(pair: tuple[FakeVm, FakeVm]) -> None:
    guard, victim = pair
    own_ll = link_local(guard.mac)
    realize(guard, allow_router_advertisements=True,
            allow_foreign_neighbor_advertisements=True)
    try:
        seen = sent_and_seen(guard, victim, [["ra", "2001:db8:600d::"],
                                             ["na", "2001:db8:76::1", guard.mac, own_ll]])
        assert seen.get("ra 2001:db8:600d::", 0) >= 1, seen
        assert seen.get(f"na 2001:db8:76::1 {guard.mac}", 0) >= 1, seen
    finally:
        realize(guard)
        victim.run("ip", "-6", "addr", "flush", "dev", "eth0", "to", "2001:db8:600d::/64")
