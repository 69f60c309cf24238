"""The client side of sessions a guest opens itself (the guest's control port 9, init.sh).

Run inside a client namespace: ``python talkkit.py VM_IP MY_IP SECONDS``. It listens on TCP
5000 and UDP 6969, asks the guest (TCP 9) to open a TCP session and a TFTP (UDP) exchange to
it, then for SECONDS keeps both going: a numbered line every 100 ms on TCP that the guest
echoes; TFTP blocks in lockstep with the guest's ACKs (20 ms apart, never ending). Each event
is one JSON line on stdout with the time since start:

- ``{"t", "ready": true}`` once both sessions run;
- ``{"t", "tcp_echo": N}`` line N came back; ``{"t", "tcp_error": "..."}`` reset or closed;
- ``{"t", "quiet": true|false}`` after the line "quiet" / "talk" on stdin: TCP lines stop
  (the session idles, nothing outstanding on either side) / start again;
- ``{"t", "udp_ack": N}`` the guest acknowledged block N (a repeated N: the guest resent it,
  i.e. it missed the next block); ``{"t", "udp_resend": N}`` the client resent block N.
Bounded: it sends at most 10 lines/s and 50 blocks/s, and stops after SECONDS.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time

TCP_PORT = 5000
UDP_PORT = 6969
START = time.monotonic()


def emit(**event: object) -> None:
    print(json.dumps({"t": round(time.monotonic() - START, 3), **event}), flush=True)


def ask(vm: str, line: str) -> None:
    # The guest answers ping as soon as eth0 has its address; its control port listens a
    # little later (init.sh starts its services after), so a refusal is retried for a while.
    deadline = time.monotonic() + 30
    while True:
        try:
            control = socket.create_connection((vm, 9), timeout=10)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    with control:
        control.sendall(line.encode() + b"\n")
        answer = control.makefile().readline().strip()
    if not answer.startswith("VMFERRY-TALK started"):
        raise SystemExit(f"the guest refused {line!r}: {answer!r}")


def main(vm: str, me: str, seconds: float) -> None:
    listener = socket.create_server((me, TCP_PORT))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((me, UDP_PORT))
    ask(vm, f"tcp {me} {TCP_PORT}")
    listener.settimeout(20)
    tcp, _ = listener.accept()
    hello = tcp.makefile("rb").readline()
    if not hello.startswith(b"VMFERRY-HELLO"):
        raise SystemExit(f"no hello from the guest: {hello!r}")
    ask(vm, f"udp {me} {UDP_PORT}")
    udp.settimeout(20)
    _, peer = udp.recvfrom(600)             # the read request
    emit(ready=True)
    block, sent_at, next_line, buffer = 1, time.monotonic(), 1, b""
    udp.sendto(struct.pack("!HH", 3, block) + b"v" * 512, peer)
    tcp.setblocking(False)
    tcp_alive, next_tcp, quiet = True, time.monotonic(), False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = time.monotonic()
        if tcp_alive and not quiet and now >= next_tcp:
            try:
                tcp.send(f"{next_line}\n".encode())
            except OSError as exc:
                emit(tcp_error=str(exc))
                tcp_alive = False
            next_line, next_tcp = next_line + 1, now + 0.1
        if now - sent_at > 1.0:             # lockstep: resend a block unanswered for 1 s
            udp.sendto(struct.pack("!HH", 3, block) + b"v" * 512, peer)
            emit(udp_resend=block)
            sent_at = now
        readable, _, _ = select.select([udp, sys.stdin, *([tcp] if tcp_alive else [])], [],
                                       [], 0.02)
        if sys.stdin in readable:
            command = sys.stdin.readline().strip()
            if command in ("quiet", "talk"):
                quiet = command == "quiet"
                emit(quiet=quiet)
        if udp in readable:
            data, _ = udp.recvfrom(600)
            opcode, number = struct.unpack("!HH", data[:4])
            if opcode == 4:
                emit(udp_ack=number)
                if number == block:
                    time.sleep(0.02)
                    block += 1
                    udp.sendto(struct.pack("!HH", 3, block) + b"v" * 512, peer)
                    sent_at = time.monotonic()
        if tcp_alive and tcp in readable:
            try:
                chunk = tcp.recv(4096)
            except OSError as exc:
                emit(tcp_error=str(exc))
                tcp_alive = False
                continue
            if not chunk:
                emit(tcp_error="closed by the guest")
                tcp_alive = False
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                emit(tcp_echo=int(line))
    tcp.close()
    udp.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
