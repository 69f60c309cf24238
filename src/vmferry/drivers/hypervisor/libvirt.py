"""libvirt driver: the same lab guests as the QMP driver, run and migrated by a libvirt daemon
(libvirt-python). Domains come from ``libvirt_xml.domain_xml``; events from
``libvirt_events``.

How the interface maps onto libvirt:

* A guest is a persistent domain (defined, then started). After an outgoing migration the
  source's definition stays, shut off with reason "migrated": that is POSTMIGRATE, and its
  job statistics stay readable until ``stop`` undefines it.
* A migration walks libvirt's phases: Begin (source), Prepare (destination: a new domain
  object, shut off, then a paused QEMU waiting for the stream), Perform (source: QEMU copies,
  pauses for the last round, completes), Finish (destination: resumes the guest), Confirm
  (source: stops its QEMU). libvirt's readings on the way are no verdict -- a source shut
  off before Confirm returned, a destination shut off or paused before it runs -- so
  ``state`` reports the side that runs the guest: the source RUNNING/PAUSED while the job
  runs, POSTMIGRATE once migrateToURI3 returned success; the destination INMIGRATE until it
  runs. A failed migration fails the source's job (libvirt resumes the source), and that
  decides.
* Migration is libvirt's peer-to-peer live migration (``migrateToURI3``): the source's daemon
  talks to the destination's (``peer_uri``, e.g. ``qemu+tcp://{host}/system``; a real site
  uses qemu+tls) and QEMU's stream goes to the agent's ``tcp:HOST:PORT`` on the migration
  network. The destination domain is created by libvirt during the migration, so ``start``
  with ``incoming_uri`` only checks the tap and records the expected guest: its state is
  INMIGRATE until libvirt's domain appears (pid 0 until then).
* ``pause_before_switchover`` is NOT supported (``PAUSE_BEFORE_SWITCHOVER = False``):
  libvirt runs the migration job itself, sets QEMU's capabilities on every start and owns
  ``migrate-continue``; a migrate-continue sent behind its back through the monitor
  passthrough (``qemuMonitorCommand``) would race libvirt's own job handling. ``migrate``
  refuses the option and ``continue_migration`` always raises HypervisorError.
* ``announce`` uses the monitor passthrough for ``announce-self``: it changes nothing libvirt
  keeps state about (libvirt marks the domain "custom-monitor" tainted in its log).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from vmferry import privileged
from vmferry.drivers.hypervisor.base import (
    GuestEvent,
    GuestSpec,
    GuestState,
    Hypervisor,
    MigrationProgress,
    MigrationTuning,
    ProgressCallback,
)
from vmferry.drivers.hypervisor.libvirt_events import EventRecorder, ensure_event_loop
from vmferry.drivers.hypervisor.libvirt_xml import (
    domain_xml,
    machine_types_from_capabilities,
    progress_from_stats,
    state_from_libvirt,
    version_from_number,
)
from vmferry.drivers.hypervisor.procstat import process_cpu_seconds
from vmferry.drivers.hypervisor.qemu_cmdline import READY_MARKER, validate_spec
from vmferry.drivers.hypervisor.uri import validate_migration_uri
from vmferry.errors import HypervisorError, WaitTimeout
from vmferry.image.builder import GuestImage

__all__ = ["PAUSE_BEFORE_SWITCHOVER", "LibvirtHypervisor"]

log = logging.getLogger(__name__)

#: This driver cannot hold a migration in "pre-switchover" (see the module docstring).
PAUSE_BEFORE_SWITCHOVER = False
#: Where a root libvirt daemon keeps its domains' logs (and here, their consoles).
DAEMON_CONSOLE_DIR = Path("/var/log/libvirt/qemu")
#: Bound for libvirt to report the migration job after migrateToURI3 was called.
JOB_START_TIMEOUT = 30.0
_TERMINAL = frozenset({"completed", "failed", "cancelled"})
#: Bound for migrateToURI3 to return once QEMU is done: libvirt then stops the source
#: (its Confirm phase), and the domain reads as shut off for a moment before "migrated".
SETTLE_TIMEOUT = 30.0


@dataclass
class _Outgoing:
    """One outgoing migration: the thread that blocks in migrateToURI3 and its outcome."""

    thread: threading.Thread | None = None
    status: str = "setup"
    error: str | None = None
    cancelled: bool = False
    postcopy: bool = False
    stats: dict[str, object] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)


class LibvirtHypervisor(Hypervisor):
    """Runs lab guests as libvirt domains of the daemon at ``uri``. ``run_dir`` holds each
    guest's recorded spec; ``console_dir`` is where that daemon's domain logs and consoles
    are as this process sees them (its /var/log/libvirt/qemu). ``tls``: migrations use
    libvirt's TLS (``VIR_MIGRATE_TLS``, certificates from the daemons' qemu.conf). Library
    errors surface as HypervisorError; bounded waits that give up raise WaitTimeout.
    ``namespace``: the network namespace of the host's taps (None: this process's)."""

    def __init__(self, run_dir: Path, image: GuestImage, *, uri: str = "qemu:///system",
                 console_dir: Path = DAEMON_CONSOLE_DIR,
                 peer_uri: str = "qemu+tcp://{host}/system", tls: bool = False,
                 namespace: str | None = None, host: str | None = None,
                 emulator: str = "/usr/bin/qemu-system-x86_64",
                 progress_interval: float = 0.5) -> None:
        self.run_dir = Path(run_dir)
        self.image = image
        self.uri = uri
        self.console_dir = Path(console_dir)
        self.peer_uri = peer_uri
        self.tls = tls
        self.namespace = namespace      # where the taps are (None: this process's)
        self.host = host or namespace
        self.emulator = emulator
        self.progress_interval = progress_interval
        self.recorder = EventRecorder()
        self._lock = threading.RLock()
        self._connection: Any = None
        self._outgoing: dict[str, _Outgoing] = {}

    # ---- connection ---------------------------------------------------------------------

    def _error(self, what: str, exc: Exception, name: str | None = None) -> HypervisorError:
        return HypervisorError(f"libvirt: cannot {what}", host=self.host, vm=name,
                               cause=str(exc) or type(exc).__name__)

    def _conn(self) -> Any:
        """The connection to the daemon, (re)opened when needed; a new connection subscribes
        to events and records VMFERRY_RESYNC for each guest that already exists."""
        with self._lock:
            conn = self._connection
            if conn is not None and conn.isAlive():
                return conn
            ensure_event_loop()
            try:
                conn = libvirt.open(self.uri)
                self.recorder.register(conn)
                conn.registerCloseCallback(lambda *_: self._forget(conn), None)
                for dom in conn.listAllDomains():
                    history = self.recorder.history(dom.name())
                    if not history.fresh:
                        status = "active" if dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE \
                            else "none"
                        history.record("VMFERRY_RESYNC", status, time.time())
            except libvirt.libvirtError as exc:
                raise self._error(f"connect to {self.uri}", exc) from exc
            self._connection = conn
            return conn

    def _forget(self, conn: Any) -> None:
        with self._lock:
            if self._connection is conn:
                self._connection = None

    def _domain(self, name: str) -> Any | None:
        try:
            return self._conn().lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise self._error(f"look up domain {name}", exc, name) from exc

    def _require(self, name: str) -> Any:
        dom = self._domain(name)
        if dom is None:
            raise HypervisorError(f"no domain {name} on this host", host=self.host, vm=name)
        return dom

    # ---- files --------------------------------------------------------------------------

    def files(self, name: str) -> dict[str, Path]:
        return {"spec": self.run_dir / f"{name}.spec.json",
                "incoming": self.run_dir / f"{name}.incoming",
                "serial": self.console_dir / f"{name}.serial.log",
                "log": self.console_dir / f"{name}.log"}

    def serial_log(self, name: str) -> Path:
        return self.files(name)["serial"]

    def spec(self, name: str) -> GuestSpec:
        """The GuestSpec a guest was started (or is expected) with. Raises HypervisorError."""
        try:
            return GuestSpec(**json.loads(self.files(name)["spec"].read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise HypervisorError(f"no spec recorded for guest {name}", host=self.host,
                                  vm=name, cause=str(exc)) from exc

    def cpu_seconds(self, name: str) -> float | None:
        """utime + stime of the domain's QEMU process (as the QEMU driver reads it)."""
        pid = self.pid(name)
        return None if pid is None else process_cpu_seconds(pid)

    def pid(self, name: str) -> int | None:
        """The pid of the guest's QEMU: the process in this network namespace whose command
        line carries the domain's UUID (libvirt's API does not tell; during a migration in
        a lab both ends' QEMUs are visible, the namespace tells them apart)."""
        dom = self._domain(name)
        if dom is None or not dom.isActive():
            return None
        needle = b"\0-uuid\0" + dom.UUIDString().encode() + b"\0"
        own_net = os.stat(f"/run/netns/{self.namespace}" if self.namespace
                          else "/proc/self/ns/net").st_ino
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                cmdline = b"\0" + Path(entry.path, "cmdline").read_bytes()
                if needle in cmdline and os.stat(f"{entry.path}/ns/net").st_ino == own_net:
                    return int(entry.name)
            except OSError:
                continue
        return None

    # ---- guests -------------------------------------------------------------------------

    def version(self) -> str:
        try:
            return version_from_number(int(self._conn().getVersion()))
        except libvirt.libvirtError as exc:
            raise self._error("read the QEMU version", exc) from exc

    def machine_types(self) -> list[str]:
        try:
            return machine_types_from_capabilities(self._conn().getCapabilities())
        except libvirt.libvirtError as exc:
            raise self._error("read capabilities", exc) from exc

    def start(self, spec: GuestSpec, *, incoming_uri: str | None = None,
              tuning: MigrationTuning | None = None) -> int:
        """Define and start the domain (or return the pid of the running one). With
        ``incoming_uri``: record the guest libvirt will create when the source migrates
        (returns 0; ``tuning`` needs nothing here: libvirt sets both sides' capabilities).
        Raises InputError for a bad spec, HypervisorError."""
        validate_spec(spec)
        if incoming_uri is not None:
            validate_migration_uri(incoming_uri)
        dom = self._domain(spec.name)
        if dom is not None and dom.isActive():
            return self.pid(spec.name) or 0
        if not privileged.link_exists(self.namespace, spec.tap):
            raise HypervisorError(f"tap {spec.tap} does not exist", host=self.host,
                                  vm=spec.name, cause="create it before starting the guest")
        self._undefine(spec.name)        # a definition left by an earlier migration
        self.run_dir.mkdir(parents=True, exist_ok=True)
        files = self.files(spec.name)
        files["spec"].write_text(json.dumps(dataclasses.asdict(spec), indent=1) + "\n")
        self.recorder.history(spec.name).reset()
        self._outgoing.pop(spec.name, None)
        if incoming_uri is not None:
            files["incoming"].write_text(incoming_uri + "\n")
            return 0
        # The XML travels to the destination: the console path is the daemon's, the same
        # on every host (each daemon's own log directory; console_dir is this process's view).
        xml = domain_xml(spec, self.image, console=DAEMON_CONSOLE_DIR / files["serial"].name,
                         emulator=self.emulator)
        try:
            dom = self._conn().defineXML(xml)
            dom.create()
        except libvirt.libvirtError as exc:
            self._undefine(spec.name)
            raise self._error(f"start guest {spec.name}", exc, spec.name) from exc
        return self.pid(spec.name) or 0

    def _undefine(self, name: str) -> None:
        dom = self._domain(name)
        if dom is None:
            return
        try:
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise self._error(f"remove domain {name}", exc, name) from exc

    def stop(self, name: str) -> None:
        """Destroy and undefine the domain; remove its spec, console and log (idempotent)."""
        outgoing = self._outgoing.get(name)
        if outgoing is not None and not outgoing.done.is_set():
            self.cancel_migration(name)
        self._undefine(name)
        self._outgoing.pop(name, None)
        for path in self.files(name).values():
            path.unlink(missing_ok=True)

    def _settle(self, name: str) -> None:
        """Wait (bounded) for an outgoing migration whose end is under way to be over, so
        that what is read next is its outcome, not libvirt's Confirm phase."""
        outgoing = self._outgoing.get(name)
        if outgoing is not None and not outgoing.done.is_set():
            outgoing.done.wait(SETTLE_TIMEOUT)

    def state(self, name: str) -> GuestState:
        """The guest's state as the engine must see it. libvirt's own (state, reason) passes
        through readings during a migration that are no verdict: the side that runs the
        guest decides, and libvirt's job tells the ending (see ``_source_state`` and
        ``_destination_state``)."""
        outgoing = self._outgoing.get(name)
        if outgoing is not None:
            return self._source_state(name, outgoing)
        found = self._read(name)
        if self.files(name)["incoming"].exists():
            return self._destination_state(name, found)
        return _plain_state(found)

    def _source_state(self, name: str, outgoing: _Outgoing) -> GuestState:
        """The source of this driver's outgoing migration. While it runs, a domain with a
        process runs or is paused (the last round, and after QEMU completed until libvirt's
        Confirm stops it); one without a process is being stopped by Confirm, so its
        outcome is awaited. After a completed migration the source is POSTMIGRATE until
        ``stop`` (libvirt already ended its QEMU; its definition stays shut off)."""
        found = self._read(name)
        if not outgoing.done.is_set():
            if found is not None and found[2]:
                return GuestState.RUNNING if found[0] == libvirt.VIR_DOMAIN_RUNNING \
                    else GuestState.PAUSED
            log.info("libvirt: source %s reads %s before its migration returned: waiting "
                     "for libvirt's outcome", name, found)
            self._settle(name)
            found = self._read(name)
        if outgoing.done.is_set() and outgoing.status == "completed" and \
                (found is None or not found[2]):
            return GuestState.POSTMIGRATE
        return _plain_state(found)

    def _destination_state(self, name: str, found: tuple[int, int, bool] | None) -> GuestState:
        """A guest expected by an incoming migration is INMIGRATE until it runs here. On
        the way libvirt's domain is absent (before Prepare), shut off (the new domain object
        before its QEMU starts), paused (starting up, receiving, Finish) -- none of which
        is a verdict: a failed incoming migration fails the source's job, which decides.
        Once it runs the arrival is over and the guest is an ordinary one."""
        if found is not None and found[0] == libvirt.VIR_DOMAIN_RUNNING:
            self.files(name)["incoming"].unlink(missing_ok=True)
            return GuestState.RUNNING
        if found is not None and found[0] != libvirt.VIR_DOMAIN_PAUSED:
            log.info("libvirt: incoming %s reads %s: still inmigrate", name, found)
        return GuestState.INMIGRATE

    def _read(self, name: str) -> tuple[int, int, bool] | None:
        """libvirt's (state, reason, has a process) of the domain, None without one."""
        dom = self._domain(name)
        if dom is None:
            return None
        try:
            state, reason = dom.state()
            return int(state), int(reason), bool(dom.isActive())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise self._error(f"read the state of {name}", exc, name) from exc

    def guests(self) -> list[str]:
        """Defined or running domains, and guests expected by an incoming migration."""
        try:
            names = {dom.name() for dom in self._conn().listAllDomains()}
        except libvirt.libvirtError as exc:
            raise self._error("list domains", exc) from exc
        if self.run_dir.is_dir():
            names |= {p.name.removesuffix(".incoming") for p in self.run_dir.glob("*.incoming")}
        return sorted(names)

    def wait_ready(self, name: str, *, timeout: float = 30.0) -> None:
        """Wait until the guest prints READY on its console. Raises WaitTimeout, or
        HypervisorError when the guest reports an error or its domain stops."""
        marker = f"{READY_MARKER} name={name}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                console = self.serial_log(name).read_text(errors="replace")
            except FileNotFoundError:
                console = ""
            if marker in console:
                return
            if "VMFERRY-ERROR" in console or "Kernel panic" in console:
                raise HypervisorError(f"guest {name} reported an error", host=self.host,
                                      vm=name, cause=console.strip()[-500:])
            if self.state(name) in (GuestState.ABSENT, GuestState.SHUTDOWN):
                raise HypervisorError(f"guest {name} stopped", host=self.host, vm=name,
                                      cause=console.strip()[-500:] or "no console output")
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"guest {name} to print {marker!r}", timeout,
                                  host=self.host, vm=name)
            time.sleep(0.05)    # the console is a plain file: nothing to wait on but the clock

    def resume(self, name: str) -> None:
        if self.state(name) != GuestState.RUNNING:
            try:
                self._require(name).resume()
            except libvirt.libvirtError as exc:
                raise self._error(f"resume {name}", exc, name) from exc

    def announce(self, name: str) -> None:
        """RARP announcements of the guest's MAC (5 rounds over ~0.5 s), through libvirt's
        monitor passthrough (see the module docstring)."""
        command = json.dumps({"execute": "announce-self", "arguments": {
            "initial": 50, "max": 550, "rounds": 5, "step": 100}})
        try:
            libvirt_qemu.qemuMonitorCommand(self._require(name), command, 0)
        except libvirt.libvirtError as exc:
            raise self._error(f"announce {name}", exc, name) from exc

    def events(self, name: str, *, after: int = 0, timeout: float = 0.0) -> list[GuestEvent]:
        self._conn()      # events arrive only while connected
        found, _ = self.recorder.history(name).wait(after, timeout)
        return found

    # ---- migration ----------------------------------------------------------------------

    def _migrate_params(self, uri: str, tuning: MigrationTuning) -> tuple[str, dict[str, Any],
                                                                          int]:
        """The peer's libvirt URI, migrateToURI3's parameters and flags for ``uri``."""
        address = uri.removeprefix("tcp:").rsplit(":", 1)[0].strip("[]")
        params: dict[str, Any] = {
            libvirt.VIR_MIGRATE_PARAM_URI: "tcp://" + uri.removeprefix("tcp:"),
            libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: address,
        }
        if tuning.bandwidth_mbps is not None:    # libvirt's unit: MiB/s
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = max(
                1, tuning.bandwidth_mbps * 1_000_000 // 8 // (1 << 20))
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                 | libvirt.VIR_MIGRATE_PERSIST_DEST)
        if tuning.auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if tuning.postcopy:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY
        if self.tls:
            flags |= libvirt.VIR_MIGRATE_TLS
            if tuning.tls_peer_name is not None:
                params[libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION] = tuning.tls_peer_name
        return self.peer_uri.format(host=address), params, flags

    def migrate(self, name: str, uri: str, tuning: MigrationTuning) -> None:
        """Start a peer-to-peer live migration to the destination listening on ``uri``;
        returns once libvirt reports the job. Raises InputError unless ``uri`` is
        tcp:HOST:PORT, HypervisorError (also for ``pause_before_switchover``)."""
        validate_migration_uri(uri)
        if tuning.pause_before_switchover:
            raise HypervisorError("the libvirt driver cannot hold a migration before "
                                  "switchover (pause_before_switchover)", host=self.host,
                                  vm=name, cause="libvirt owns migrate-continue")
        dom = self._require(name)
        previous = self._outgoing.get(name)
        if previous is not None and not previous.done.is_set():
            raise HypervisorError(f"guest {name} is already migrating", host=self.host, vm=name)
        dconnuri, params, flags = self._migrate_params(uri, tuning)
        try:
            dom.migrateSetMaxDowntime(tuning.max_downtime_ms, 0)
        except libvirt.libvirtError as exc:
            raise self._error(f"set the downtime limit of {name}", exc, name) from exc
        outgoing = _Outgoing()
        self.recorder.completed_stats.pop(name, None)
        self._outgoing[name] = outgoing
        outgoing.thread = threading.Thread(
            target=self._run_migration, args=(name, dom, outgoing, dconnuri, params, flags),
            name=f"migrate-{name}", daemon=True)
        outgoing.thread.start()
        deadline = time.monotonic() + JOB_START_TIMEOUT
        while not outgoing.done.is_set() and self._job_type(dom) == libvirt.VIR_DOMAIN_JOB_NONE:
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"libvirt to start migrating {name}", JOB_START_TIMEOUT,
                                  host=self.host, vm=name)
            outgoing.done.wait(0.02)
        if outgoing.done.is_set() and outgoing.status == "failed":
            raise HypervisorError(f"migration of {name} failed to start", host=self.host,
                                  vm=name, cause=outgoing.error)

    def _job_type(self, dom: Any) -> int:
        try:
            return int(dom.jobInfo()[0])
        except libvirt.libvirtError:
            return int(libvirt.VIR_DOMAIN_JOB_NONE)

    def _run_migration(self, name: str, dom: Any, outgoing: _Outgoing, dconnuri: str,
                       params: dict[str, Any], flags: int) -> None:
        """The migration thread: migrateToURI3 blocks until the migration has ended."""
        try:
            dom.migrateToURI3(dconnuri, params, flags)
            outgoing.status = "completed"
            outgoing.stats = self._completed_stats(name, dom) or outgoing.stats
        except libvirt.libvirtError as exc:
            outgoing.status = "cancelled" if outgoing.cancelled else "failed"
            outgoing.error = str(exc)
            self.recorder.record(name, "MIGRATION", outgoing.status)
        finally:
            outgoing.done.set()

    def _completed_stats(self, name: str, dom: Any) -> dict[str, object]:
        try:
            return dict(dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
        except libvirt.libvirtError:
            return dict(self.recorder.completed_stats.get(name, {}))

    def migration_progress(self, name: str) -> MigrationProgress:
        outgoing = self._outgoing.get(name)
        dom = self._domain(name)
        if outgoing is not None and not outgoing.done.is_set() and (
                dom is None or name in self.recorder.completed_stats
                or self._job_type(dom) == libvirt.VIR_DOMAIN_JOB_NONE):
            self._settle(name)      # QEMU is done: report libvirt's outcome, not "setup"
        if outgoing is not None and outgoing.done.is_set():
            stats = outgoing.stats or self.recorder.completed_stats.get(name, {})
            return progress_from_stats(outgoing.status, stats, outgoing.error)
        if dom is None or self._job_type(dom) == libvirt.VIR_DOMAIN_JOB_NONE:
            return MigrationProgress(status="setup" if outgoing is not None else "none")
        try:
            stats = dict(dom.jobStats(0))
        except libvirt.libvirtError as exc:
            raise self._error(f"read the migration of {name}", exc, name) from exc
        if outgoing is not None:
            outgoing.stats = stats       # the last figures, should the final ones be missing
        return progress_from_stats(
            "postcopy-active" if outgoing is not None and outgoing.postcopy else "active", stats)

    def wait_migration(self, name: str, *, timeout: float,
                       on_progress: ProgressCallback | None = None,
                       postcopy_after_s: float | None = None) -> MigrationProgress:
        """Wait for the outgoing migration to end, reporting progress every
        ``progress_interval``. Raises WaitTimeout after cancelling."""
        outgoing = self._outgoing.get(name)
        if outgoing is None:
            return self.migration_progress(name)
        start = time.monotonic()
        while True:
            progress = self.migration_progress(name)
            if on_progress is not None:
                on_progress(progress)
            if progress.status in _TERMINAL:
                return progress
            elapsed = time.monotonic() - start
            if (postcopy_after_s is not None and not outgoing.postcopy
                    and progress.status == "active" and elapsed >= postcopy_after_s):
                self.start_postcopy(name)
            if elapsed >= timeout:
                self.cancel_migration(name)
                raise WaitTimeout(f"migration of guest {name} to finish (was "
                                  f"{progress.status}; cancelled)", timeout, host=self.host,
                                  vm=name)
            outgoing.done.wait(min(self.progress_interval, max(0.0, timeout - elapsed)))

    def start_postcopy(self, name: str) -> None:
        """Switch to postcopy (the migration must have been started with it allowed)."""
        try:
            self._require(name).migrateStartPostCopy(0)
        except libvirt.libvirtError as exc:
            raise self._error(f"switch {name} to postcopy", exc, name) from exc
        outgoing = self._outgoing.get(name)
        if outgoing is not None:
            outgoing.postcopy = True

    def continue_migration(self, name: str) -> None:
        """Always raises HypervisorError: this driver never holds a migration in
        "pre-switchover" (PAUSE_BEFORE_SWITCHOVER)."""
        raise HypervisorError(f"migration of {name} is not in status pre-switchover: the "
                              "libvirt driver does not pause before switchover",
                              host=self.host, vm=name)

    def cancel_migration(self, name: str, *, timeout: float = 15.0) -> None:
        """Abort the outgoing migration and wait until it has ended; the source keeps (or
        goes back to) running. Raises WaitTimeout if it does not end in time."""
        outgoing = self._outgoing.get(name)
        if outgoing is None or outgoing.done.is_set():
            return
        outgoing.cancelled = True
        try:
            self._require(name).abortJob()
        except libvirt.libvirtError as exc:
            if not outgoing.done.is_set():
                raise self._error(f"cancel the migration of {name}", exc, name) from exc
        if not outgoing.done.wait(timeout):
            raise WaitTimeout(f"migration of guest {name} to cancel", timeout,
                              host=self.host, vm=name)


def _plain_state(found: tuple[int, int, bool] | None) -> GuestState:
    """GuestState of a domain no migration of this driver is about."""
    if found is None:
        return GuestState.ABSENT
    state = state_from_libvirt(found[0], found[1])
    # A domain that stopped for any other reason than a migration has no process.
    return GuestState.ABSENT if state is GuestState.SHUTDOWN and not found[2] else state
