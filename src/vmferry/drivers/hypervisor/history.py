"""The bounded event log of a guest, shared by the QEMU driver and the fake."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Collection

from vmferry.drivers.hypervisor.base import GuestEvent

__all__ = ["HISTORY_LENGTH", "EventHistory"]

HISTORY_LENGTH = 1000


class EventHistory:
    """Bounded, thread-safe event log of one guest. ``seq`` never goes back within a process,
    even across ``reset`` (a restarted guest of the same name)."""

    def __init__(self, maxlen: int = HISTORY_LENGTH) -> None:
        self._events: collections.deque[GuestEvent] = collections.deque(maxlen=maxlen)
        self._seq = 0
        self._changed = threading.Condition()
        #: Set by reset(): the next connection is the first to a new guest (no resync).
        self.fresh = False

    @property
    def last_seq(self) -> int:
        with self._changed:
            return self._seq

    def record(self, kind: str, status: str | None, timestamp: float) -> GuestEvent:
        with self._changed:
            self._seq += 1
            event = GuestEvent(seq=self._seq, kind=kind, status=status, timestamp=timestamp)
            self._events.append(event)
            self._changed.notify_all()
            return event

    def reset(self) -> None:
        """Forget the events of a previous guest of this name (seq keeps counting)."""
        with self._changed:
            self._events.clear()
            self.fresh = True

    def after(self, seq: int, kinds: Collection[str] | None = None) -> list[GuestEvent]:
        with self._changed:
            return self._after(seq, kinds)

    def _after(self, seq: int, kinds: Collection[str] | None) -> list[GuestEvent]:
        return [e for e in self._events
                if e.seq > seq and (kinds is None or e.kind in kinds)]

    def wait(self, seq: int, timeout: float,
             kinds: Collection[str] | None = None) -> tuple[list[GuestEvent], int]:
        """Events after ``seq`` (of ``kinds``), waiting up to ``timeout`` s for one; also the
        last seq seen, so a caller filtering by kind does not wake again for the others."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._changed:
            while True:
                found = self._after(seq, kinds)
                left = deadline - time.monotonic()
                if found or left <= 0:
                    return found, self._seq
                self._changed.wait(left)
