"""libvirt's event loop and the guest events the libvirt driver records from it.

libvirt delivers domain events only to a process that runs an event loop: the default
implementation (``virEventRegisterDefaultImpl``, registered before the first connection is
opened) driven by one daemon thread per process. Each event becomes a ``GuestEvent`` in the
guest's bounded history, in QMP's words where there is one:

    lifecycle SUSPENDED        -> STOP        (also "MIGRATION"/"postcopy-active" for postcopy)
    lifecycle RESUMED          -> RESUME
    lifecycle STARTED          -> START       (status: "migrated" for an incoming guest)
    lifecycle STOPPED/CRASHED  -> SHUTDOWN    (status: libvirt's reason, e.g. "migrated")
    JOB_COMPLETED              -> MIGRATION   "completed" (its statistics are kept)
    MIGRATION_ITERATION        -> MIGRATION_PASS (status: the iteration)

libvirt's events carry no time of their own: the timestamp is this process's clock when the
event arrived (QEMU's QMP timestamps stay inside libvirt).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import libvirt

from vmferry.drivers.hypervisor.history import EventHistory

__all__ = ["EventRecorder", "ensure_event_loop"]

_loop_lock = threading.Lock()
_loop_started = False

_STOPPED_REASONS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
}


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once per
    process). Must run before the connections whose events are wanted are opened."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr by default; the driver raises them instead.
        libvirt.registerErrorHandler(lambda *_: None, None)

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


class EventRecorder:
    """Keeps each guest's history and the last completed job's statistics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._histories: dict[str, EventHistory] = {}
        self.completed_stats: dict[str, dict[str, object]] = {}

    def history(self, name: str) -> EventHistory:
        with self._lock:
            return self._histories.setdefault(name, EventHistory())

    def register(self, conn: Any) -> list[int]:
        """Subscribe to every domain's events on ``conn``; returns the callback ids."""
        return [
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                        self._lifecycle, None),
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
                                        self._job_completed, None),
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION,
                                        self._iteration, None),
        ]

    def record(self, name: str, kind: str, status: str | None) -> None:
        self.history(name).record(kind, status, time.time())

    # Callbacks run on the event loop thread; they only record.

    def _lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        name = dom.name()
        if event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
            self.record(name, "STOP", None)
            if detail == libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY:
                self.record(name, "MIGRATION", "postcopy-active")
        elif event == libvirt.VIR_DOMAIN_EVENT_RESUMED:
            self.record(name, "RESUME", None)
        elif event == libvirt.VIR_DOMAIN_EVENT_STARTED:
            incoming = detail == libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED
            self.record(name, "START", "migrated" if incoming else None)
        elif event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED):
            reason = _STOPPED_REASONS.get(detail, "crashed") \
                if event == libvirt.VIR_DOMAIN_EVENT_STOPPED else "crashed"
            self.record(name, "SHUTDOWN", reason)

    def _job_completed(self, _conn: Any, dom: Any, params: dict[str, object],
                       _opaque: Any) -> None:
        name = dom.name()
        with self._lock:
            self.completed_stats[name] = dict(params)
        self.record(name, "MIGRATION", "completed")

    def _iteration(self, _conn: Any, dom: Any, iteration: int, _opaque: Any) -> None:
        self.record(dom.name(), "MIGRATION_PASS", str(iteration))
