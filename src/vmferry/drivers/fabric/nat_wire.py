"""Two small wire chores the NAT way runs inside a router's namespace (``NftNat`` starts
this module there with ``ip netns exec``, so no thread of the controller changes namespace):

    python -m vmferry.drivers.fabric.nat_wire garp IFACE ADDRESS
        one gratuitous ARP on IFACE: ADDRESS is at IFACE's MAC (clients update their caches)
    python -m vmferry.drivers.fabric.nat_wire tell ADDRESS PORT LINE
        send LINE to a guest's control port, print its one-line answer (exit 1: none)
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

ETH_P_ARP = 0x0806
TIMEOUT_S = 5.0


def garp(ifname: str, address: str) -> None:
    mac = bytes.fromhex(Path(f"/sys/class/net/{ifname}/address").read_text().strip()
                        .replace(":", ""))
    ip = socket.inet_aton(address)
    arp = (b"\x00\x01\x08\x00\x06\x04\x00\x02"          # Ethernet/IPv4, a reply
           + mac + ip + b"\xff" * 6 + ip)
    frame = b"\xff" * 6 + mac + ETH_P_ARP.to_bytes(2, "big") + arp
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, ETH_P_ARP))
        for _ in range(2):
            sock.send(frame)


def tell(address: str, port: int, line: str) -> str:
    with socket.create_connection((address, port), timeout=TIMEOUT_S) as sock:
        sock.sendall(line.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while b"\n" not in answer:
            chunk = sock.recv(512)
            if not chunk:
                break
            answer += chunk
    return answer.decode(errors="replace").strip()


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "garp":
        garp(argv[1], argv[2])
        return 0
    if len(argv) == 4 and argv[0] == "tell":
        try:
            print(tell(argv[1], int(argv[2]), argv[3]))
        except OSError as exc:
            print(f"no answer from {argv[1]}:{argv[2]}: {exc}", file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
