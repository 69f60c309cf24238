"""A TCP echo session across the move: the client sends a short message every 10 ms to the
guest's echo service (port 7) and times each message's echo; the *stall* is the longest a
message waited for its echo (TCP retransmits what the network dropped, so a lost frame shows
up as a stall of a retransmission timeout, not as a loss).

Run inside a lab namespace (``python -m vmferry.bench.migration.tcpecho ADDRESS SECONDS
INTERVAL_MS``); it prints one JSON line when SIGINT ends it or SECONDS pass. ``stall`` is pure.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from vmferry.errors import WaitTimeout

MESSAGE = 8                    # bytes per message
PORT = 7
CONNECT_WINDOW_S = 25.0        # the parent waits 30 s for the first line


def stall(sent: Sequence[float], echoed: Sequence[tuple[float, int]], ended: float) -> float:
    """The longest wait of a message for its echo, in ms. ``sent``: send times (message i is
    bytes [8i, 8i+8)); ``echoed``: (time, total bytes echoed so far); ``ended``: when the
    session stopped (a message never echoed waited until then)."""
    longest = 0.0
    index = 0
    for moment, total in echoed:
        while index < len(sent) and (index + 1) * MESSAGE <= total:
            longest = max(longest, moment - sent[index])
            index += 1
    for moment in sent[index:]:
        longest = max(longest, ended - moment)
    return round(longest * 1000, 1)


def connect(address: str, window_s: float) -> socket.socket:
    """Connect to the guest's echo service, trying again (a SYN lost while the guest is busy
    under TCG costs a 1 s retransmission, a listener restarting refuses) until ``window_s``
    has passed; the last error is reported on stdout and raised."""
    deadline = time.monotonic() + window_s
    while True:
        try:
            return socket.create_connection((address, PORT), timeout=3)
        except OSError as exc:
            if time.monotonic() >= deadline:
                print(json.dumps({"connected": False, "error": f"{type(exc).__name__}: {exc}"}),
                      flush=True)
                raise
            time.sleep(0.2)


def session(address: str, seconds: float, interval_ms: float) -> dict[str, Any]:
    stop = False

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    sent: list[float] = []
    echoed: list[tuple[float, int]] = []
    total = 0
    sock = connect(address, CONNECT_WINDOW_S)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        print(json.dumps({"connected": True}), flush=True)
        deadline = time.monotonic() + seconds
        next_send = time.monotonic()
        while not stop and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_send:
                try:
                    sock.send(len(sent).to_bytes(MESSAGE, "big"))
                    sent.append(time.time())
                except BlockingIOError:
                    pass
                next_send += interval_ms / 1000
            ready, _, _ = select.select([sock], [], [], max(0.0, next_send - time.monotonic()))
            if ready:
                data = sock.recv(65536)
                if not data:
                    break
                total += len(data)
                echoed.append((time.time(), total))
    ended = time.time()
    return {"sent": len(sent), "echoed_bytes": total,
            "complete": total >= len(sent) * MESSAGE,
            "longest_stall_ms": stall(sent, echoed, ended)}


class EchoSession:
    """One TCP echo session run in ``namespace`` for one measurement window."""

    def __init__(self, namespace: str, address: str, interval_ms: float = 10.0,
                 max_seconds: float = 300.0) -> None:
        self.argv = ["ip", "netns", "exec", namespace, sys.executable, "-m",
                     "vmferry.bench.migration.tcpecho", address, str(max_seconds),
                     str(interval_ms)]
        self._proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Connect (the first line says so). Raises ``WaitTimeout``."""
        self._proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else ""
        if '"connected": true' not in line:
            self.kill()
            if '"error"' in line:
                reason = json.loads(line)["error"]
                raise WaitTimeout(f"a TCP echo session to connect (last: {reason})", timeout)
            raise WaitTimeout("a TCP echo session to connect", timeout)

    def stop(self) -> dict[str, Any]:
        proc, self._proc = self._proc, None
        if proc is None:
            raise RuntimeError("the echo session was not started")
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=5)
            return {"error": "the echo session did not stop"}
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            return {"error": (err or out).strip()[-300:] or f"exit {proc.returncode}"}
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


if __name__ == "__main__":
    print(json.dumps(session(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))), flush=True)
