"""Helpers for port-profile tests: a lab host's softswitch, and "fake VM" ports.

A fake VM is a namespace of the test's own with one veth end (``eth0``, given the VM's MAC and
address); the other end is a port on the host's ``br-vm``, realized through the same code path
as a guest's tap. From it a test can send what a guest could not be made to send: forged source
MACs and addresses, broadcast floods, an iperf3 stream.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmferry import privileged
from vmferry.drivers.softswitch.base import PortSpec
from vmferry.drivers.softswitch.ovs import OvsSoftswitch
from vmferry.drivers.softswitch.ovs import profile as port_profile
from vmferry.model.profile import parse_profile

BRIDGE = "br-vm"


def host_switch(state_dir: Path, lab: str, host: str) -> OvsSoftswitch:
    ovs_dir = state_dir / "labs" / lab / "ovs" / host
    return OvsSoftswitch(ovs_dir / "db.sock", rundir=ovs_dir)


def snapshot(switch: OvsSoftswitch) -> tuple[Any, Any, Any]:
    """The bridge's ports (OVSDB), flow dump and meters."""
    return switch.ports(BRIDGE), switch.dump_flows(BRIDGE), switch.dump_meters(BRIDGE)


@dataclass
class FakeVm:
    switch: OvsSoftswitch
    host_ns: str
    name: str          # short: the port is "fk-<name>", the namespace "vfp<pid>-<name>"
    mac: str
    ip: str            # with prefix
    vlan: int = 100

    @property
    def port(self) -> str:
        return f"fk-{self.name}"

    @property
    def ns(self) -> str:
        return f"vfp{os.getpid()}-{self.name}"

    @property
    def address(self) -> str:
        return self.ip.split("/")[0]

    def create(self) -> None:
        privileged.create_namespace(self.ns)
        privileged.create_veth(self.host_ns, self.port, self.ns, "eth0")
        self.run("ip", "link", "set", "eth0", "address", self.mac)
        self.run("ip", "link", "set", "lo", "up")
        self.run("ip", "link", "set", "eth0", "up")
        self.run("ip", "addr", "add", self.ip, "dev", "eth0")
        privileged.set_link_up(self.host_ns, self.port)
        self.switch.ensure_port(BRIDGE, PortSpec(name=self.port, tag=self.vlan,
                                                 vlan_mode="access",
                                                 external_ids={"vmferry-owner": "test"}))
        self.switch.wait_for_port(BRIDGE, self.port)

    def realize(self, profile: dict[str, Any]) -> None:
        port_profile.realize(self.switch, BRIDGE, self.port, self.mac, [self.ip],
                             parse_profile({"version": 1, **profile}))

    def destroy(self) -> None:
        try:
            port_profile.remove(self.switch, BRIDGE, self.port)
            self.switch.delete_port(BRIDGE, self.port)
        finally:
            privileged.delete_link(self.host_ns, self.port)
            privileged.delete_namespace(self.ns)

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], check=False,
                              capture_output=True, text=True, timeout=timeout)

    def pings(self, address: str, count: int = 3, source: str | None = None) -> int:
        """Replies received out of ``count`` pings (bounded: 1 s per reply at most)."""
        extra = ["-I", source] if source else []
        result = self.run("ping", "-n", "-c", str(count), "-W", "1", "-i", "0.2", *extra,
                          address)
        for line in result.stdout.splitlines():
            if "received" in line:
                return int(line.split(",")[1].split()[0])
        return 0

    def arp_flood(self, target_ip: str, frames: int, seconds: float) -> int:
        """Send up to ``frames`` broadcast ARP requests from the VM's own MAC and address
        within ``seconds``; returns how many were sent."""
        script = f"""
import socket, struct, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
mac = bytes.fromhex("{self.mac.replace(':', '')}")
spa = socket.inet_aton("{self.address}"); tpa = socket.inet_aton("{target_ip}")
frame = (b"\\xff" * 6 + mac + b"\\x08\\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
         + mac + spa + b"\\x00" * 6 + tpa).ljust(60, b"\\x00")
sent, end = 0, time.monotonic() + {seconds}
while sent < {frames} and time.monotonic() < end:
    s.send(frame); sent += 1
    if sent % 50 == 0:
        time.sleep(0.005)
print(sent)
"""
        result = self.run(sys.executable, "-c", script, timeout=seconds + 10)
        return int(result.stdout.strip() or "0")


def wait_until(check: Any, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return False


UDP_RECEIVER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
total, first, last = 0, None, None
end = time.monotonic() + float(sys.argv[3])
print("ready", flush=True)
while time.monotonic() < end:
    try:
        data = s.recv(65535)
    except socket.timeout:
        if first is not None:
            break
        continue
    now = time.monotonic()
    first = now if first is None else first
    last = now
    total += len(data)
print(total, (last or 0) - (first or 0), flush=True)
"""

UDP_SENDER = """
import socket, sys, time
target, port, kbps, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = b"x" * 1200
interval = len(payload) * 8 / (kbps * 1000)
start = time.monotonic(); sent = 0
while time.monotonic() - start < seconds:
    s.sendto(payload, (target, port)); sent += 1
    delay = start + sent * interval - time.monotonic()
    if delay > 0:
        time.sleep(delay)
print(sent)
"""


def udp_stream_kbps(sender_ns: str, receiver_ns: str, address: str, send_kbps: int,
                    seconds: float = 3.0, port: int = 5201) -> float:
    """Send UDP at ``send_kbps`` for ``seconds`` from one namespace to ``address`` in
    another; returns the rate received (kbit/s over the arrival window)."""
    receiver = subprocess.Popen(["ip", "netns", "exec", receiver_ns, sys.executable, "-c",
                                 UDP_RECEIVER, str(port), "1.0", str(seconds + 5)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", sender_ns, sys.executable, "-c", UDP_SENDER,
                        address, str(port), str(send_kbps), str(seconds)], check=True,
                       capture_output=True, timeout=seconds + 10)
        out, _ = receiver.communicate(timeout=seconds + 10)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(timeout=5)
    total, window = out.split()
    return int(total) * 8 / 1000 / max(float(window), 0.001)

