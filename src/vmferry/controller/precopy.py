"""The precopy phase: memory is copied while the VM runs, until QEMU stops it for the last
round and reports ``completed``.

The engine follows the source guest's QMP events (the agent's long poll) and reacts to them at
once: ``STOP`` and ``completed`` are timestamped in the result, ``STOP`` opens the
make-before-break gate (staged when the precopy starts; QEMU is not held for it),
``completed`` ends the phase so the switchover starts without waiting for a poll. Between
events it reads QEMU's progress at a bounded rate (for the progress display, the convergence
timeout, postcopy, cancel and the destination's health). An agent without the events route
is polled instead (``FALLBACK_POLL_S``). A postcopy whose stream hangs is paused on both ends
(``POSTCOPY_STALL_S``); a paused postcopy ends this phase and ``recovery`` re-links it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from vmferry import failpoints
from vmferry.api.agent import GuestEvent, MigrateRequest, MigrationProgress
from vmferry.controller.migration_uri import incoming_uri
from vmferry.controller.run import Cancelled, Run
from vmferry.controller.switchover import MakeBeforeBreak
from vmferry.controller.truth import POSTCOPY, POSTCOPY_STUCK
from vmferry.errors import MigrationError, VmferryError, WaitTimeout

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
FALLBACK_POLL_S = 0.05
# A postcopy that moves no byte for this long has a hung stream (a link that drops packets
# without a reset: QEMU only notices a socket that fails): it is paused on both ends
# (``migrate-pause``) so that recovery can re-link it.
POSTCOPY_STALL_S = 5.0
ACTIVE_QEMU_STATES = {"setup", "active", "pre-switchover", "device", "postcopy-active",
                      "postcopy-paused", "postcopy-recover", "wait-unplug", "cancelling"}


def precopy(run: Run) -> None:
    """Start the outgoing migration (once per run) and follow it to ``completed``."""
    result = run.result()
    mbb = run.make_before_break()
    # The gate opens on the source's STOP as the agent's own QEMU reports it. libvirt hosts
    # get no window (as before: they could not hold QEMU for it); how fast libvirt's STOP
    # arrives is not measured yet, and a gate opened after the resume would delay delivery.
    if mbb is not None and run.controller.topology().host(run.source).hypervisor != "qemu":
        mbb = None
    if mbb is not None:
        _switchover_step(run, mbb.prepare, "staged")
    # A guest that itself arrived by migration reports that incoming migration as
    # "completed": only what this run recorded says whether the outgoing one was issued.
    if not result.get("migrate_issued"):
        cursor = run.last_event_seq(run.source)
        run.record_result(migrate_issued=True, source_event_seq=cursor)
        uri = incoming_uri(run.controller.topology(), run.destination,
                           result.get("incoming_uri") or run.dst.guest(run.vm).incoming_uri,
                           vm=run.vm)
        run.src.migrate(run.vm, MigrateRequest(
            uri=uri, peer=run.destination, options=run.options,
            pause_before_switchover=bool(mbb and mbb.pause_before_switchover and run.controller
                                         .topology().host(run.source).pauses_before_switchover)))
    _Follow(run, mbb, int(run.result().get("source_event_seq") or 0)).until_completed()


def _switchover_step(run: Run, step: Callable[[], None], outcome: str) -> None:
    """Run a make-before-break step; the migration works without the rules, so a failure is
    recorded, not raised."""
    try:
        step()
        run.record_result(make_before_break=outcome)
    except VmferryError as exc:
        log.warning("migration %s: make-before-break %s failed: %s", run.id, outcome,
                    exc.message)
        run.record_result(make_before_break=f"{outcome}-failed",
                          make_before_break_problems=[exc.message])


class _Follow:
    """Follows one outgoing migration until QEMU reports it completed."""

    def __init__(self, run: Run, mbb: MakeBeforeBreak | None, cursor: int) -> None:
        self.run = run
        self.mbb = mbb
        self.cursor = cursor
        self.events_route = True
        self.started = time.monotonic()
        self.next_poll = 0.0
        self.postcopy_requested = False
        self.continued = False
        self.done = False
        self.postcopy_bytes = -1
        self.postcopy_moved = 0.0
        self.pause_requested = False

    def until_completed(self) -> None:
        run = self.run
        while not self.done:
            if time.monotonic() >= self.next_poll:
                self.poll()
                if self.done:
                    self.drain()
                    return
                self.next_poll = time.monotonic() + (
                    PROGRESS_INTERVAL_S if self.events_route else FALLBACK_POLL_S)
            wait = max(0.0, self.next_poll - time.monotonic())
            if not self.events_route:
                time.sleep(wait)
                continue
            try:
                events = run.src.guest_events(run.vm, self.cursor, wait)
            except VmferryError as exc:
                log.info("migration %s: no guest events from %s (%s): polling", run.id,
                         run.source, exc.message)
                self.events_route = False
                continue
            for event in events:
                self.cursor = event.seq
                self.on_event(event)
                if self.done:
                    return

    def drain(self) -> None:
        """Completion was read from progress before its events: record their timestamps."""
        if not self.events_route:
            return
        try:
            events = self.run.src.guest_events(self.run.vm, self.cursor, 0)
        except VmferryError:
            return
        for event in events:
            self.cursor = event.seq
            if event.kind == "STOP":
                self.run.record_event("source_stop", event.timestamp)
            elif event.kind == "MIGRATION" and event.status == "completed":
                self.run.record_event("source_completed", event.timestamp)

    def on_event(self, event: GuestEvent) -> None:
        run = self.run
        if event.kind == "STOP":
            run.record_event("source_stop", event.timestamp)
            self.open_window(stop_recorded=True)
        elif event.kind == "MIGRATION" and event.status is not None:
            if event.status == "completed":
                run.record_event("source_completed", event.timestamp)
            self.on_status(event.status, None)

    def on_status(self, status: str, progress: MigrationProgress | None) -> None:
        """React to QEMU's migration status (from an event or a progress read)."""
        run = self.run
        if status in ("pre-switchover", "device", "completed"):
            self.open_window()      # the guest has stopped (no STOP event seen: polling)
        if status == "pre-switchover" and not self.continued:
            self.continued = True
            run.src.continue_migration(run.vm)
        elif status == "completed":
            # A controller killed here: QEMU completed, the controller has not acted on it.
            failpoints.reached("inside:precopy-completed")
            # From the event the switchover starts at once; QEMU's final figures are read
            # there (``phases.record_final_progress``), off this path.
            if progress is not None:
                run.record_result(qemu=progress.model_dump(mode="json"),
                                  progress=progress.model_dump(mode="json"))
            self.done = True
        elif status in POSTCOPY_STUCK:
            # Both ends hold parts of the memory: the decision (recovery.settle) recovers
            # or holds it; nothing here may cancel or delete.
            raise MigrationError(f"QEMU migration {status}", vm=run.vm)
        elif status in {"failed", "cancelled"}:
            error = (progress or run.src.migration(run.vm)).error
            raise MigrationError(f"QEMU migration {status}: {error or 'no reason given'}",
                                 vm=run.vm)
        elif status not in ACTIVE_QEMU_STATES:
            raise MigrationError(f"source QEMU reports migration status {status!r}", vm=run.vm)

    def watch_postcopy(self, progress: MigrationProgress) -> None:
        """Pause a postcopy whose stream hangs, on both ends (best effort: an end that
        cannot be paused is paused again by the recovery)."""
        now = time.monotonic()
        if progress.transferred_bytes != self.postcopy_bytes:
            self.postcopy_bytes, self.postcopy_moved = progress.transferred_bytes, now
            return
        if self.pause_requested or now - self.postcopy_moved < POSTCOPY_STALL_S:
            return
        run = self.run
        self.pause_requested = True
        log.warning("migration %s: postcopy moved no byte in %.0fs: pausing it to re-link",
                    run.id, now - self.postcopy_moved)
        run.record_result(postcopy_stalled_at=progress.transferred_bytes)
        for end in (run.src, run.dst):
            try:
                end.pause_migration(run.vm)
            except VmferryError as exc:
                log.info("migration %s: migrate-pause failed: %s", run.id, exc.message)

    def open_window(self, stop_recorded: bool = False) -> None:
        """The source stopped the guest: open the make-before-break gate, once. The store
        says the guest stopped before the gate opens (its STOP, else "opening")."""
        if self.mbb is not None and not self.mbb.opened:
            if not stop_recorded:
                self.run.record_result(make_before_break="opening")
            _switchover_step(self.run, self.mbb.open, "opened")

    def poll(self) -> None:
        """Progress, and the checks that need no event: destination alive, cancel,
        postcopy, convergence timeout."""
        run = self.run
        progress = run.src.migration(run.vm)
        if progress.status == "active" and progress.transferred_bytes:
            failpoints.reached("inside:precopy-copying")      # QEMU is copying right now
        run.progress(progress)
        self.on_status(progress.status, progress)
        if self.done:
            return
        if progress.status == "postcopy-active":
            self.watch_postcopy(progress)
        if run.dst.guest_state(run.vm) == "absent":
            # QEMU's own verdict first: a broken stream also ends the destination's QEMU.
            latest = run.src.migration(run.vm)
            self.on_status(latest.status, latest)
            if self.done:
                return
            raise MigrationError(f"destination QEMU on {run.destination} died", vm=run.vm)
        status = progress.status
        elapsed = time.monotonic() - self.started
        if run.cancelled.is_set() and status not in POSTCOPY:
            raise Cancelled("cancelled by the operator", vm=run.vm, phase="precopy")
        options = run.options
        if (options.postcopy_allowed and not self.postcopy_requested
                and elapsed > options.postcopy_after() and status == "active"):
            run.src.start_postcopy(run.vm)
            self.postcopy_requested = True
        if elapsed > options.timeout_s and status not in POSTCOPY:
            raise WaitTimeout(f"the migration of {run.vm} to converge (dirty rate "
                              f"{progress.dirty_pages_rate} pages/s, {progress.remaining_bytes} "
                              "bytes left)", options.timeout_s)
