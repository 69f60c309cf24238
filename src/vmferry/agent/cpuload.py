"""Each guest's CPU load, from two readings of the CPU time its process has used
(``Hypervisor.cpu_seconds``) at least ``min_interval`` apart.

A load is CPU seconds per second: 1.0 is one CPU kept busy. The agent reads it for every
report (heartbeats every 2 s), so the controller's copy is the load over the last few seconds.
A guest's first reading gives no load yet; a new process (the counter went back) starts over.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vmferry.drivers.hypervisor.base import Hypervisor

MIN_INTERVAL_S = 1.0


@dataclass(frozen=True)
class _Reading:
    at: float
    used: float
    load: float | None


class CpuLoad:
    """Guests' CPU loads on one host, from their hypervisor's CPU-time counters."""

    def __init__(self, hypervisor: Hypervisor, *, min_interval: float = MIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hypervisor = hypervisor
        self.min_interval = min_interval
        self.clock = clock
        self._last: dict[str, _Reading] = {}
        self._lock = threading.Lock()    # reports come from the heartbeat and the API at once

    def sample(self, names: Iterable[str]) -> dict[str, float]:
        """The load of each of ``names`` known so far (a guest read only once is left out).
        A reading closer than ``min_interval`` to the last keeps the last load (too short an
        interval would be all noise)."""
        names = list(names)
        used_now = {n: self.hypervisor.cpu_seconds(n) for n in names}
        now = self.clock()
        loads: dict[str, float] = {}
        with self._lock:
            for name in set(self._last) - set(names):
                del self._last[name]
            for name, used in used_now.items():
                last = self._last.get(name)
                if used is None:
                    self._last.pop(name, None)
                    continue
                if last is None or used < last.used:
                    last = self._last[name] = _Reading(now, used, None)
                elif now - last.at >= self.min_interval:
                    load = round((used - last.used) / (now - last.at), 3)
                    last = self._last[name] = _Reading(now, used, load)
                if last.load is not None:
                    loads[name] = last.load
        return loads
