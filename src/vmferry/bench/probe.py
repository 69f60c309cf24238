"""The network probe of the benchmarks: ``ping`` every 1-2 ms from a lab client, bounded in
count and time, and what its output says about a blackout.

Parsing is pure (``parse_ping``) so it can be tested without a lab; ``PingProbe`` starts and
stops one ``ping`` process inside a lab namespace and only ever signals that process.
"""

from __future__ import annotations

import itertools
import math
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import IO, Any

from vmferry.errors import WaitTimeout

# "[1732530000.123456] 64 bytes from 192.0.2.51: icmp_seq=12 ttl=64 time=0.52 ms"
_REPLY = re.compile(r"^\[(?P<ts>\d+\.\d+)\].*icmp_seq=(?P<seq>\d+)")
_SUMMARY = re.compile(r"(?P<sent>\d+) packets transmitted, (?P<received>\d+) received")
# Replies to the last probes sent before SIGINT may still be in flight: do not count them lost.
IN_FLIGHT_S = 0.05


@dataclass(frozen=True)
class ProbeResult:
    """What one probe window saw.

    ``lost`` counts probes sent and never answered (the last ``IN_FLIGHT_S`` excluded);
    ``blackout_ms`` is the network blackout as the issue defines it, the traffic lost: ``lost``
    times the interval ping really kept; ``reply_gap_ms`` is the longest silence between two
    consecutive replies (or from the last reply to the end of the window, if the replies never
    came back) -- it also counts frames that were queued and answered late, not lost;
    ``longest_loss_run`` is the
    longest run of consecutive unanswered probes. ``effective_interval_ms`` is how often ping
    really sent: on a loaded machine it falls behind the interval it was asked for."""

    interval_ms: float
    effective_interval_ms: float | None
    sent: int
    received: int
    lost: int
    longest_loss_run: int
    blackout_ms: float
    reply_gap_ms: float
    recovered: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_ping(output: str, interval_ms: float, ended_at: float | None = None) -> ProbeResult:
    """Read ``ping -D`` output. ``ended_at`` (epoch seconds) is when the window closed, to count
    a silence that lasted to the end. Raises ``ValueError`` when the output has no summary."""
    replies: dict[int, float] = {}
    for line in output.splitlines():
        match = _REPLY.match(line.strip())
        if match:
            replies.setdefault(int(match.group("seq")), float(match.group("ts")))
    summary = _SUMMARY.search(output)
    if summary is None:
        raise ValueError("ping printed no statistics line")
    sent = int(summary.group("sent"))
    in_flight = math.ceil(IN_FLIGHT_S * 1000 / interval_ms)
    counted = max(sent - in_flight, 0)
    first_seq = min(replies) if replies and min(replies) == 0 else 1
    expected = range(first_seq, first_seq + counted)
    missing = [seq for seq in expected if seq not in replies]
    times = sorted(replies.values())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    last_seq = max(replies) if replies else first_seq - 1
    recovered = bool(replies) and not any(seq > last_seq for seq in missing)
    if ended_at is not None and times and not recovered:
        gaps.append(ended_at - times[-1])
    reply_gap_ms = max(gaps, default=0.0) * 1000
    if not times and ended_at is not None:
        reply_gap_ms = counted * interval_ms
    effective = None
    if len(replies) >= 2 and max(replies) > min(replies):
        effective = round((replies[max(replies)] - replies[min(replies)]) * 1000
                          / (max(replies) - min(replies)), 2)
    blackout_ms = len(missing) * (effective or interval_ms)
    return ProbeResult(interval_ms=interval_ms, effective_interval_ms=effective, sent=sent,
                       received=len(replies),
                       lost=len(missing), longest_loss_run=_longest_run(missing),
                       blackout_ms=round(blackout_ms, 1), reply_gap_ms=round(reply_gap_ms, 1),
                       recovered=recovered)


def _longest_run(numbers: list[int]) -> int:
    longest = run = 0
    previous: int | None = None
    for n in numbers:
        run = run + 1 if previous is not None and n == previous + 1 else 1
        longest = max(longest, run)
        previous = n
    return longest


class PingProbe:
    """``ping -D -i INTERVAL`` from ``namespace`` to ``address`` for one measurement window.

    Bounded twice: ``-c`` (count) and ``-w`` (deadline, seconds). ``stop()`` sends SIGINT to the
    one process it started so ping prints its statistics."""

    def __init__(self, namespace: str, address: str, *, interval_ms: float = 2.0,
                 max_seconds: float = 120.0) -> None:
        if not 1.0 <= interval_ms <= 1000.0:
            raise ValueError("interval_ms must be between 1 and 1000")
        self.namespace = namespace
        self.address = address
        self.interval_ms = interval_ms
        self.max_seconds = max_seconds
        self._proc: subprocess.Popen[str] | None = None
        # Not a pipe: ping would block writing once 64 KiB of unread lines fill it.
        self._output: IO[str] | None = None

    def start(self) -> None:
        count = int(self.max_seconds * 1000 / self.interval_ms)
        argv = ["ip", "netns", "exec", self.namespace, "ping", "-D", "-n",
                "-i", f"{self.interval_ms / 1000:.3f}", "-c", str(count),
                "-w", str(math.ceil(self.max_seconds)), "-W", "1", self.address]
        self._output = tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen(argv, stdout=self._output, stderr=subprocess.STDOUT,
                                      text=True)

    def stop(self) -> ProbeResult:
        """End the window and read what ping saw. Raises ``WaitTimeout`` if ping does not end."""
        proc = self._proc
        if proc is None:
            raise RuntimeError("probe was not started")
        self._proc = None
        ended_at = time.time()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.wait(timeout=5)
            self._close_output()
            raise WaitTimeout(f"ping in {self.namespace} to stop", 10) from exc
        assert self._output is not None
        self._output.seek(0)
        output = self._output.read()
        self._close_output()
        return parse_ping(output, self.interval_ms, ended_at=ended_at)

    def _close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None

    def kill(self) -> None:
        """Stop the probe without reading it (on failure paths)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        self._close_output()


def wait_reachable(namespace: str, address: str, timeout: float = 60.0) -> float:
    """Wait until ``address`` answers a ping from ``namespace``; returns seconds waited.
    Raises ``WaitTimeout``."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(["ip", "netns", "exec", namespace, "ping", "-n", "-c", "1",
                                 "-W", "1", address], check=False, capture_output=True, text=True,
                                timeout=10)
        if result.returncode == 0:
            return time.monotonic() - started
        time.sleep(0.2)
    raise WaitTimeout(f"{address} to answer pings from {namespace}", timeout)
