"""A guest port's connection-tracking state on this host: read it (a migration's source),
carry it (a migration's destination), and take the carry flows away once they did their work.

The flows themselves are ``vmferry.drivers.softswitch.ovs.conntrack``'s. Here: the wire
models, and a sweeper per port that removes the carry flows whose connection has been
committed, and all of them after ``CARRY_EXPIRY_S`` (a connection idle that long has timed out
of a UDP or ICMP tracker anyway; a TCP one re-enters through the profile's rules, or is lost
as it would be on any stateful firewall that restarted).
"""

from __future__ import annotations

import logging
import threading
import time

from vmferry.api.agent import ConnEntryBody, ConnTuple
from vmferry.drivers.softswitch.base import ConnEntry, Softswitch, Tuple5
from vmferry.drivers.softswitch.ovs import conntrack as carry
from vmferry.errors import VmferryError

LOG = logging.getLogger(__name__)

CARRY_EXPIRY_S = 300.0
# OpenFlow has no event for "this flow matched": the sweeper reads the counters this often.
SWEEP_INTERVAL_S = 0.5


def to_wire(entry: ConnEntry) -> ConnEntryBody:
    return ConnEntryBody(protocol=entry.protocol,  # type: ignore[arg-type]
                         orig=ConnTuple(**entry.orig.__dict__),
                         reply=ConnTuple(**entry.reply.__dict__),
                         zone=entry.zone, state=entry.state)


def from_wire(body: ConnEntryBody) -> ConnEntry:
    def way(t: ConnTuple) -> Tuple5:
        return Tuple5(str(t.src), str(t.dst), t.sport, t.dport)
    return ConnEntry(body.protocol, way(body.orig), way(body.reply), body.zone, body.state)


class CarrySweeper:
    """One background sweep per port with carry flows; a new carry restarts its clock."""

    def __init__(self, softswitch: Softswitch, bridge: str,
                 expiry_s: float = CARRY_EXPIRY_S, interval_s: float = SWEEP_INTERVAL_S) -> None:
        self.softswitch = softswitch
        self.bridge = bridge
        self.expiry_s = expiry_s
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._deadlines: dict[str, float] = {}
        self._stop = threading.Event()

    def watch(self, port: str) -> None:
        """Sweep ``port`` until its carry flows are gone or expired."""
        with self._lock:
            running = port in self._deadlines
            self._deadlines[port] = time.monotonic() + self.expiry_s
        if not running:
            threading.Thread(target=self._run, args=(port,), name=f"carry-sweep-{port}",
                             daemon=True).start()

    def watching(self, port: str) -> bool:
        """Whether the port's carry flows are still within their time (a sweep will remove
        them); carry flows of a port not watched are leftovers."""
        with self._lock:
            return self._deadlines.get(port, 0.0) > time.monotonic()

    def forget(self, port: str) -> None:
        with self._lock:
            self._deadlines.pop(port, None)

    def close(self) -> None:
        self._stop.set()

    def _run(self, port: str) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                deadline = self._deadlines.get(port)
            if deadline is None:
                return
            try:
                if time.monotonic() >= deadline:
                    carry.remove(self.softswitch, self.bridge, port)
                    left = 0
                else:
                    left = carry.sweep(self.softswitch, self.bridge, port)
            except VmferryError as exc:
                LOG.warning("sweeping the carried conntrack flows of %s: %s", port, exc)
                continue
            if left == 0:
                with self._lock:
                    if self._deadlines.get(port) == deadline:
                        self._deadlines.pop(port, None)
                        return
