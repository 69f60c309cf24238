"""The ping probe: ``ping -D`` every 1-2 ms from a lab client, bounded in count and time,
and what its output says about the interruption a user feels.

Parsing is pure (``parse_ping``); ``PingProbe`` starts and stops one ``ping`` process inside
a lab namespace and only ever signals that process.

Definitions (per migration window):
- a probe is *timely* when its first reply came back within ``max(10 ms, 5 x the median RTT
  of the probes sent before the move)``; a reply after that is *late*;
- the *interruption* is the longest span between the send times of two consecutive timely
  probes (or from the last timely probe to the end of the window less the threshold): the
  time during which
  nothing a user sent got a timely answer. Undisturbed, it is one probe interval;
- *lost*: probes never answered (those still in flight at the end excluded); *duplicates*:
  replies ping flags ``DUP!`` (a frame answered twice).
"""

from __future__ import annotations

import itertools
import math
import re
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import IO, Any

from vmferry.errors import WaitTimeout

# "[1732530000.123456] 64 bytes from 192.0.2.51: icmp_seq=12 ttl=64 time=0.52 ms (DUP!)"
_REPLY = re.compile(r"^\[(?P<ts>\d+\.\d+)\].*icmp_seq=(?P<seq>\d+).*time=(?P<rtt>[\d.]+) ms")
_SUMMARY = re.compile(r"(?P<sent>\d+) packets transmitted")
IN_FLIGHT_S = 1.0            # ping -W 1: replies to the last second's probes may be pending
MIN_TIMELY_MS = 10.0
TIMELY_FACTOR = 5.0


@dataclass(frozen=True)
class Reply:
    seq: int
    received: float          # epoch s
    rtt_ms: float

    @property
    def sent(self) -> float:
        return self.received - self.rtt_ms / 1000


@dataclass(frozen=True)
class ProbeResult:
    interval_ms: float
    effective_interval_ms: float | None
    sent: int
    answered: int
    lost: int | None          # None for a pair of addresses (parse_ping_pair)
    duplicates: int
    late: int | None
    max_rtt_ms: float | None
    baseline_rtt_ms: float | None
    timely_ms: float
    interruption_ms: float
    interruption_from: float | None      # send time (epoch) of the last timely probe before
    first_timely_after: float | None     # arrival (epoch) of the first timely reply after

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_replies(output: str) -> tuple[list[Reply], int, int]:
    """(first replies by sequence, duplicates, probes sent) from ``ping -D`` output; icmp_seq
    wraps at 65536 and is unwrapped. Raises ``ValueError`` without a statistics line."""
    summary = _SUMMARY.search(output)
    if summary is None:
        raise ValueError("ping printed no statistics line")
    first: dict[int, Reply] = {}
    duplicates = 0
    wraps = 0
    last_raw = -1
    for line in output.splitlines():
        match = _REPLY.match(line.strip())
        if not match:
            continue
        raw = int(match.group("seq"))
        if last_raw - raw > 32768:
            wraps += 1
        last_raw = raw
        seq = raw + wraps * 65536
        if "DUP!" in line or seq in first:
            duplicates += 1
            continue
        first[seq] = Reply(seq, float(match.group("ts")), float(match.group("rtt")))
    return sorted(first.values(), key=lambda r: r.seq), duplicates, int(summary.group("sent"))


def parse_ping(output: str, interval_ms: float, moved_at: float, ended_at: float,
               ) -> ProbeResult:
    """The figures of one window; ``moved_at``: when the move began (epoch s; probes sent
    before it give the baseline RTT), ``ended_at``: when the window closed. Raises
    ``ValueError`` when ping printed no statistics."""
    replies, duplicates, sent = parse_replies(output)
    timely_ms, baseline = _threshold(replies, moved_at)
    timely = [r for r in replies if r.rtt_ms < timely_ms]
    first_seq = 1 if not replies or replies[0].seq >= 1 else 0
    in_flight = math.ceil(IN_FLIGHT_S * 1000 / interval_ms)
    counted = range(first_seq, first_seq + max(sent - in_flight, 0))
    answered = {r.seq for r in replies}
    lost = sum(1 for seq in counted if seq not in answered)
    span, span_from, first_after = _longest_gap(timely, ended_at, timely_ms,
                                                sent * interval_ms / 1000)
    effective = None
    if len(replies) >= 2 and replies[-1].seq > replies[0].seq:
        effective = round((replies[-1].sent - replies[0].sent) * 1000
                          / (replies[-1].seq - replies[0].seq), 3)
    return ProbeResult(
        interval_ms=interval_ms, effective_interval_ms=effective, sent=sent,
        answered=len(replies), lost=lost, duplicates=duplicates,
        late=len(replies) - len(timely),
        max_rtt_ms=max((r.rtt_ms for r in replies), default=None),
        baseline_rtt_ms=baseline, timely_ms=round(timely_ms, 3),
        interruption_ms=round(span * 1000, 1), interruption_from=span_from,
        first_timely_after=first_after)


def parse_ping_pair(before: str, after: str, interval_ms: float, moved_at: float,
                    ended_at: float) -> ProbeResult:
    """The figures of a window in which the guest's address changes (a move by dual NIC):
    ``before`` is ping's output for the address the guest had, ``after`` for the one it
    takes. Timely as in ``parse_ping`` (the baseline from the old address); the interruption
    is the longest span with no timely reply from either address. *Lost* and *late* are None:
    each address is meant to stop (or start) answering during the window, so neither count
    says what a user missed. Raises ``ValueError`` when either ping printed no statistics."""
    old, old_dups, old_sent = parse_replies(before)
    new, new_dups, new_sent = parse_replies(after)
    timely_ms, baseline = _threshold(old, moved_at)
    timely = sorted((r for r in old + new if r.rtt_ms < timely_ms), key=lambda r: r.sent)
    span, span_from, first_after = _longest_gap(timely, ended_at, timely_ms,
                                                old_sent * interval_ms / 1000)
    return ProbeResult(
        interval_ms=interval_ms, effective_interval_ms=None, sent=old_sent + new_sent,
        answered=len(old) + len(new), lost=None, duplicates=old_dups + new_dups, late=None,
        max_rtt_ms=max((r.rtt_ms for r in old + new), default=None),
        baseline_rtt_ms=baseline, timely_ms=round(timely_ms, 3),
        interruption_ms=round(span * 1000, 1), interruption_from=span_from,
        first_timely_after=first_after)


def _threshold(replies: list[Reply], moved_at: float) -> tuple[float, float | None]:
    """(the timely threshold in ms, the baseline RTT): from the probes sent before the move."""
    before = [r.rtt_ms for r in replies if r.sent < moved_at]
    baseline = statistics.median(before) if before else None
    return (max(MIN_TIMELY_MS, TIMELY_FACTOR * baseline) if baseline else MIN_TIMELY_MS,
            baseline)


def _longest_gap(timely: list[Reply], ended_at: float, timely_ms: float, window_s: float,
                 ) -> tuple[float, float | None, float | None]:
    """(span s, send time of the last timely probe before it, arrival of the first timely
    reply after it) of the longest span between the send times of consecutive timely probes
    (``timely`` in send order); ``window_s`` when none was timely."""
    span, span_from, first_after = 0.0, None, None
    for a, b in itertools.pairwise(timely):
        if b.sent - a.sent > span:
            span, span_from, first_after = b.sent - a.sent, a.sent, b.received
    # Probes sent until the threshold before the end had the time to be answered timely.
    tail = ended_at - timely_ms / 1000 - timely[-1].sent if timely else 0.0
    if tail > span:
        span, span_from, first_after = tail, timely[-1].sent, None
    if not timely:
        span = window_s
    return span, span_from, first_after


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

    def stop(self, moved_at: float) -> ProbeResult:
        """End the window and read what ping saw. Raises ``WaitTimeout`` if ping does not end,
        ``ValueError`` if its output has no statistics."""
        output, ended_at = self.stop_output()
        return parse_ping(output, self.interval_ms, moved_at=moved_at, ended_at=ended_at)

    def stop_output(self) -> tuple[str, float]:
        """End the window: (ping's output, when the window closed, epoch s). Raises
        ``WaitTimeout`` if ping does not end."""
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
        return output, ended_at

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
