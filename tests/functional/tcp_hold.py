"""Run inside a client namespace: hold one TCP connection to a guest's echo port open.

Prints OK <n> after each echoed line; reads a line from stdin before each further round, so the
test decides when to send (before and after a migration). Bounded: 10 s per round trip."""

import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
sock = socket.create_connection((host, port), timeout=10)
for n in range(1, 100):
    message = f"round-{n}\n".encode()
    sock.sendall(message)
    received = b""
    while not received.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            print(f"CLOSED {n}", flush=True)
            sys.exit(1)
        received += chunk
    print(f"OK {n}" if received == message else f"BAD {n} {received!r}", flush=True)
    if not sys.stdin.readline():
        break
