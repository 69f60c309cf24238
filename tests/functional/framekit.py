"""Raw Ethernet frames for functional tests, run inside a lab namespace:

    python framekit.py send IFACE DST_MAC VLAN|- MARKER COUNT
        send COUNT frames to DST_MAC (802.1Q-tagged with VLAN, or untagged with "-"), each
        carrying MARKER in its payload (EtherType 0x88b5, local experimental)
    python framekit.py capture IFACE SECONDS MARKER
        count the frames seen on IFACE (either direction) whose bytes contain MARKER during
        SECONDS; prints the count

Bounded: at most 1000 frames, at most 30 s of capture.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
EXPERIMENTAL = 0x88B5


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def frame(dst: str, src: str, vlan: int | None, marker: bytes) -> bytes:
    header = mac_bytes(dst) + mac_bytes(src)
    if vlan is not None:
        header += struct.pack("!HH", 0x8100, vlan & 0x0FFF)
    payload = marker.ljust(46, b"\0")
    return header + struct.pack("!H", EXPERIMENTAL) + payload


def own_mac(iface: str) -> str:
    with open(f"/sys/class/net/{iface}/address") as f:
        return f.read().strip()


def send(iface: str, dst: str, vlan: str, marker: str, count: int) -> None:
    count = min(count, 1000)
    data = frame(dst, own_mac(iface), None if vlan == "-" else int(vlan), marker.encode())
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((iface, 0))
        for _ in range(count):
            sock.send(data)
            time.sleep(0.002)


def capture(iface: str, seconds: float, marker: str) -> int:
    seconds = min(seconds, 30.0)
    seen = 0
    needle = marker.encode()
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as sock:
        sock.bind((iface, 0))
        sock.settimeout(0.1)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65535)
            except TimeoutError:
                continue
            if needle in data:
                seen += 1
    return seen


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
    elif sys.argv[1] == "capture":
        print(capture(sys.argv[2], float(sys.argv[3]), sys.argv[4]), flush=True)
    else:
        raise SystemExit(f"unknown command {sys.argv[1]}")
