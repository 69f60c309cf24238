"""QEMU driver: disk-less lab guests under TCG, controlled over QMP with ``qemu.qmp``.

Each guest is one detached QEMU (its own session: it outlives the agent) confined by
seccomp (``-sandbox``, see qemu_cmdline.SANDBOX); its files are laid out by
``guest_files``. The pieces: ``qemu_cmdline`` (the command line, pure), ``qmp_session`` (QMP
connections, event history, bounded waits), ``qemu_migration`` (migration control, TLS) and
this module, the driver. The public methods are a synchronous facade; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shlex
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from vmferry import privileged
from vmferry.drivers.hypervisor.base import (
    GuestEvent,
    GuestNic,
    GuestSpec,
    GuestState,
    Hypervisor,
    MigrationProgress,
    MigrationTuning,
    ProgressCallback,
)
from vmferry.drivers.hypervisor.procstat import process_cpu_seconds
from vmferry.drivers.hypervisor.qemu_cmdline import (
    MIN_QEMU_VERSION,
    NAME_RE,
    READY_MARKER,
    SUN_PATH_MAX,
    guest_files,
    hotplug_ports,
    kernel_append,
    nic_device,
    parse_kernel_append,
    qemu_argv,
    root_port,
    state_from_status,
    validate_nic,
    validate_spec,
    version_from_text,
)
from vmferry.drivers.hypervisor.qemu_migration import (
    TERMINAL_MIGRATION_STATUSES,
    QemuMigration,
    check_tls_dir,
    progress_from_query,
)
from vmferry.drivers.hypervisor.qemu_tls import ensure_dh_params
from vmferry.drivers.hypervisor.qmp_session import QmpSession
from vmferry.drivers.hypervisor.uri import validate_migration_uri
from vmferry.errors import HypervisorError, SetupError, WaitTimeout
from vmferry.image.builder import GuestImage

#: Bound for a QEMU to open its QMP socket (TCG on a loaded 2-core machine can be slow).
START_TIMEOUT = 60.0

__all__ = [
    "MIN_QEMU_VERSION",
    "TERMINAL_MIGRATION_STATUSES",
    "QemuHypervisor",
    "guest_files",
    "kernel_append",
    "parse_kernel_append",
    "progress_from_query",
    "qemu_argv",
    "state_from_status",
    "validate_migration_uri",
    "validate_spec",
]

log = logging.getLogger(__name__)


# ---- the driver ---------------------------------------------------------------------------------

# A QEMU started moments ago under TCG on a loaded host answered its first commands in over
# 10 s (the 100-move soak at load 13-16 lost one move to it); below the controller's 30 s
# call to the agent, so a slow QEMU is still reported as such.
QMP_REPLY_S = 20.0


class QemuHypervisor(Hypervisor):
    """Runs lab guests as detached QEMU processes (TCG) in ``namespace`` (None: the current
    one), with their files in ``run_dir``. With ``tls_dir`` (a directory from ``vmferry pki
    issue``) every migration in and out runs over TLS. Library errors surface as
    HypervisorError; bounded waits that give up raise WaitTimeout."""

    def __init__(self, run_dir: Path, image: GuestImage, *,
                 qemu_binary: str = "qemu-system-x86_64", namespace: str | None = None,
                 host: str | None = None, qmp_timeout: float = QMP_REPLY_S,
                 progress_interval: float = 0.5, tls_dir: Path | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.image = image
        self.qemu_binary = qemu_binary
        self.namespace = namespace
        self.host = host or namespace
        self.qmp_timeout = qmp_timeout
        self.progress_interval = progress_interval
        self.qmp = QmpSession(lambda name: self.files(name)["qmp"],
                              lambda name: self.pid(name) is not None,
                              host=self.host, timeout=qmp_timeout)
        self.migration = QemuMigration(
            self.qmp, tls_dir=None if tls_dir is None else check_tls_dir(Path(tls_dir)),
            progress_interval=progress_interval)
        if tls_dir is not None:
            ensure_dh_params(Path(tls_dir))     # else every destination generates its own
        self._version: str | None = None
        self._machines: list[str] | None = None

    # ---- files and processes --------------------------------------------------------------

    def files(self, name: str) -> dict[str, Path]:
        return guest_files(self.run_dir, name)

    def serial_log(self, name: str) -> Path:
        return self.files(name)["serial"]

    def console(self, name: str) -> str | None:
        try:
            return self.serial_log(name).read_text(errors="replace")
        except FileNotFoundError:
            return None

    def pid(self, name: str) -> int | None:
        """The pid of the guest's QEMU, or None. A pidfile whose pid now belongs to another
        process (pid reuse after a crash) does not count."""
        files = self.files(name)
        pid = privileged.read_pidfile(files["pid"])
        if pid is None or not privileged.pid_alive(pid):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\x00")
        except OSError:
            return None
        qmp_arg = f"unix:{files['qmp']},server=on,wait=off".encode()
        return pid if qmp_arg in cmdline else None

    def cpu_seconds(self, name: str) -> float | None:
        """utime + stime of the guest's QEMU (``procstat``: TCG has no vCPU stats in QMP)."""
        pid = self.pid(name)
        return None if pid is None else process_cpu_seconds(pid)

    def spec(self, name: str) -> GuestSpec:
        """The GuestSpec a running guest was started with. Raises HypervisorError."""
        try:
            data = json.loads(self.files(name)["spec"].read_text())
            aux = data.pop("aux_nic", None)
            return GuestSpec(**data, aux_nic=GuestNic(**aux) if aux else None)
        except (OSError, ValueError, TypeError) as exc:
            raise HypervisorError(f"no spec recorded for guest {name}", host=self.host,
                                  vm=name, cause=str(exc)) from exc

    def guests(self) -> list[str]:
        """Names of guests with a live QEMU, found from the pidfiles in run_dir."""
        if not self.run_dir.is_dir():
            return []
        names = (p.name.removesuffix(".pid") for p in self.run_dir.glob("*.pid"))
        return sorted(n for n in names if NAME_RE.match(n) and self.pid(n) is not None)

    def start(self, spec: GuestSpec, *, incoming_uri: str | None = None,
              tuning: MigrationTuning | None = None) -> int:
        """Start a guest, or return the pid of the one already running under that name.

        With ``incoming_uri`` QEMU starts with ``-incoming defer``, gets the migration
        capabilities ``tuning`` needs (postcopy must be enabled on both sides) and then
        listens on the URI. Raises InputError for a bad spec, HypervisorError when QEMU
        fails to start or the tap is missing."""
        validate_spec(spec)
        if incoming_uri is not None:
            validate_migration_uri(incoming_uri)
        existing = self.pid(spec.name)
        if existing is not None:
            return existing
        files = self.files(spec.name)
        if len(str(files["qmp"])) > SUN_PATH_MAX:
            raise HypervisorError(f"run dir path too long for a unix socket: {files['qmp']}",
                                  host=self.host, vm=spec.name)
        if not privileged.link_exists(self.namespace, spec.tap):
            raise HypervisorError(f"tap {spec.tap} does not exist", host=self.host,
                                  vm=spec.name, cause="create it before starting the guest")
        self._remove_files(spec.name)   # leftovers of a guest that died
        self.qmp.history(spec.name).reset()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        files["qmp"].parent.mkdir(parents=True, exist_ok=True)
        self._write_spec(spec)
        argv = qemu_argv(spec, self.image, files, qemu_binary=self.qemu_binary,
                         incoming=incoming_uri is not None)
        started = time.monotonic()
        pid = self._launch(spec.name, argv)
        launched = time.monotonic()
        if incoming_uri is not None:
            try:
                self.migration.listen(spec.name, incoming_uri, tuning or MigrationTuning())
            except Exception:
                self.stop(spec.name)
                raise
        # Where a destination's start goes (issue 14 measures it from the agents' logs).
        log.info("guest %s: QEMU up on QMP in %.0f ms, listening after %.0f ms more",
                 spec.name, (launched - started) * 1000, (time.monotonic() - launched) * 1000)
        return pid

    def _launch(self, name: str, argv: list[str]) -> int:
        """Start QEMU in its own session (it outlives this process) and wait, bounded, until
        it answers on QMP; the connection made here records the guest's events from now on.
        Not ``-daemonize``: its fork and setsid are what ``-sandbox`` denies."""
        proc = privileged.spawn_in_namespace(self.namespace, argv,
                                             log_path=self.files(name)["log"])
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                if proc.poll() is not None:
                    raise HypervisorError(f"QEMU failed to start guest {name}",
                                          host=self.host, vm=name, cause=self._log_tail(name)
                                          or f"exit status {proc.returncode}",
                                          argv=shlex.join(argv))
                pid = self.pid(name)
                if pid is not None and self.files(name)["qmp"].exists():
                    with contextlib.suppress(HypervisorError):  # bound, not yet listening
                        self.qmp.connect(name)
                        return pid
                if time.monotonic() >= deadline:
                    raise WaitTimeout(f"QEMU of guest {name} to answer on QMP", START_TIMEOUT,
                                      host=self.host, vm=name)
                # QEMU opens the socket during its init; nothing to wait on but the clock.
                time.sleep(0.02)
        except Exception:
            self._kill_and_clean(name)
            raise

    def _log_tail(self, name: str) -> str:
        try:
            return self.files(name)["log"].read_text(errors="replace").strip()[-800:]
        except OSError:
            return ""

    def stop(self, name: str) -> None:
        """Stop the guest's QEMU (SIGTERM, then SIGKILL) and remove its files (idempotent)."""
        self._kill_and_clean(name)

    def connect(self, name: str | None = None) -> None:
        """Connect to a guest's QMP (None: to every guest of ``run_dir``), so its events are
        recorded from now on: what a restarted agent calls first. Each connection records a
        VMFERRY_RESYNC event with the migration status. Raises HypervisorError."""
        for guest in [name] if name is not None else self.guests():
            self.qmp.connect(guest)

    def disconnect(self, name: str | None = None) -> None:
        """Close this process's QMP connection to a guest (None: to all of ``run_dir``'s).
        A QMP socket serves one client at a time; another process can connect after this.
        The next call that needs QMP reconnects."""
        for guest in [name] if name is not None else self.guests():
            self.qmp.disconnect(guest)

    def _kill_and_clean(self, name: str) -> None:
        self.disconnect(name)
        pid = self.pid(name)
        if pid is not None:
            privileged.stop_pid(pid, timeout=5.0)
        self._remove_files(name)

    def _remove_files(self, name: str) -> None:
        files = self.files(name)
        for path in files.values():
            path.unlink(missing_ok=True)
        if files["qmp"].parent != self.run_dir:
            with contextlib.suppress(OSError):   # other guests may still have sockets there
                files["qmp"].parent.rmdir()

    def wait_ready(self, name: str, *, timeout: float = 30.0) -> None:
        """Wait until the guest prints READY on its console (networking and services up).
        Raises WaitTimeout, or HypervisorError when QEMU exits or the guest reports an error."""
        self.wait_console(name, f"{READY_MARKER} name={name}", timeout=timeout)

    def wait_console(self, name: str, text: str, *, timeout: float = 30.0) -> str:
        """Wait until ``text`` appears on the guest's console (e.g. "VMFERRY-WORKLOAD": the
        memory workload runs); returns the console so far. Raises WaitTimeout, or
        HypervisorError when QEMU exits or the guest reports VMFERRY-ERROR or a panic."""
        serial = self.serial_log(name)
        deadline = time.monotonic() + timeout
        while True:
            try:
                console = serial.read_text(errors="replace")
            except FileNotFoundError:
                console = ""
            if text in console:
                return console
            if "VMFERRY-ERROR" in console or "Kernel panic" in console:
                raise HypervisorError(f"guest {name} reported an error", host=self.host,
                                      vm=name, cause=console.strip()[-500:])
            if self.pid(name) is None:
                raise HypervisorError(f"QEMU of guest {name} exited", host=self.host, vm=name,
                                      cause=console.strip()[-500:] or "no console output")
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"guest {name} to print {text!r}", timeout, host=self.host,
                                  vm=name)
            # The console is a plain file: nothing to wait on but the clock.
            time.sleep(0.05)

    # ---- NIC hot-plug (a move by "dual" NIC) -------------------------------------------

    def plug_nic(self, name: str, nic: GuestNic) -> None:
        """netdev_add + device_add on the free root port; the spec file records it, so the
        NIC is known after an agent restart. Raises InputError, HypervisorError."""
        validate_nic(name, nic)
        spec = self.spec(name)
        if not hotplug_ports(spec) or nic.slot == spec.nic_slot:
            raise HypervisorError(f"guest {name} has no free root port {nic.slot}",
                                  host=self.host, vm=name)
        if nic_device(nic.slot) not in self._devices(name):
            if not privileged.link_exists(self.namespace, nic.tap):
                raise HypervisorError(f"tap {nic.tap} does not exist", host=self.host, vm=name)
            self._netdev(name, "netdev_add", {
                "type": "tap", "id": f"n{nic.slot}", "ifname": nic.tap,
                "script": "no", "downscript": "no", "vnet_hdr": False}, "Duplicate")
            self._execute(name, "device_add", {
                "driver": "virtio-net-pci", "id": nic_device(nic.slot),
                "netdev": f"n{nic.slot}", "mac": nic.mac.lower(), "romfile": "",
                "bus": root_port(nic.slot)})
        self._write_spec(dataclasses.replace(spec, aux_nic=nic))

    def unplug_nic(self, name: str, slot: int, *, timeout: float = 30.0) -> None:
        """device_del, wait (bounded, on DEVICE_DELETED) for the guest to release it,
        netdev_del. If the unplugged NIC was the main one, the other becomes main in the
        spec. Raises HypervisorError, WaitTimeout."""
        spec = self.spec(name)
        if nic_device(slot) in self._devices(name):
            self._execute(name, "device_del", {"id": nic_device(slot)})
            self.qmp.wait_until(
                name, lambda: f"guest {name} to release NIC {nic_device(slot)}", timeout,
                {"DEVICE_DELETED"},
                lambda: True if nic_device(slot) not in self._devices(name) else None,
                interval=0.5)
        self._netdev(name, "netdev_del", {"id": f"n{slot}"}, "not found")
        if spec.aux_nic is not None and spec.nic_slot == slot:     # the main NIC went
            spec = dataclasses.replace(spec, mac=spec.aux_nic.mac, tap=spec.aux_nic.tap,
                                       nic_slot=spec.aux_nic.slot, aux_nic=None)
        elif spec.aux_nic is not None and spec.aux_nic.slot == slot:
            spec = dataclasses.replace(spec, aux_nic=None)
        self._write_spec(spec)

    def _devices(self, name: str) -> set[str]:
        reply = self._execute(name, "qom-list", {"path": "/machine/peripheral"})
        return {str(item.get("name")) for item in reply or []}

    def _netdev(self, name: str, cmd: str, args: dict[str, object], already: str) -> None:
        """netdev_add/netdev_del, where QEMU's answer ``already`` means it is done (QEMU has
        no query of netdevs): safe to repeat."""
        try:
            self._execute(name, cmd, args)
        except HypervisorError as exc:
            if already not in str(exc.fields.get("cause", "")):
                raise

    def _write_spec(self, spec: GuestSpec) -> None:
        self.files(spec.name)["spec"].write_text(
            json.dumps(dataclasses.asdict(spec), indent=1) + "\n")

    def _execute(self, name: str, cmd: str, args: dict[str, object] | None = None) -> Any:
        return self.qmp.execute(name, cmd, args)

    # ---- state ----------------------------------------------------------------------------

    def state(self, name: str) -> GuestState:
        if self.pid(name) is None:
            return GuestState.ABSENT
        reply = self._execute(name, "query-status")
        return state_from_status(str(reply.get("status", "")))

    def version(self) -> str:
        """QEMU's version, e.g. "10.0.2", from ``qemu --version`` (needs no guest)."""
        if self._version is None:
            try:
                result = subprocess.run([self.qemu_binary, "--version"], capture_output=True,
                                        text=True, timeout=30, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise HypervisorError(f"cannot run {self.qemu_binary} --version",
                                      host=self.host, cause=str(exc)) from exc
            self._version = version_from_text(result.stdout)
        return self._version

    def check_setup(self) -> None:
        """Raise SetupError unless QEMU is new enough (7.2 corrupts migrated TCG guests)."""
        version = self.version()
        if tuple(int(p) for p in version.split(".")[:2]) < MIN_QEMU_VERSION:
            raise SetupError(f"QEMU {version} is too old: vmferry needs "
                             f">= {'.'.join(map(str, MIN_QEMU_VERSION))}",
                             cause="run scripts/install-system-deps.sh")

    def machine_types(self) -> list[str]:
        """Machine types (and aliases such as "q35") from query-machines of a probe QEMU."""
        if self._machines is None:
            self._machines = self._probe_machines()
        return list(self._machines)

    def _probe_machines(self) -> list[str]:
        with tempfile.TemporaryDirectory(prefix="vmferry-probe-") as tmp:
            sock, pidfile = Path(tmp) / "qmp", Path(tmp) / "pid"
            # -daemonize returns once QMP listens, like a guest's start: no connect race.
            argv = [self.qemu_binary, "-machine", "none", "-accel", "tcg", "-nodefaults",
                    "-display", "none", "-S", "-qmp", f"unix:{sock},server=on,wait=off",
                    "-pidfile", str(pidfile), "-daemonize"]
            try:
                result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                        check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise HypervisorError(f"cannot run {self.qemu_binary}", host=self.host,
                                      cause=str(exc)) from exc
            pid = privileged.read_pidfile(pidfile)
            try:
                if result.returncode != 0 or pid is None:
                    raise HypervisorError("probe QEMU failed to start", host=self.host,
                                          cause=result.stderr.strip()[-500:])
                reply = self.qmp.hub.run(self._query_machines(str(sock)), self.qmp_timeout)
            except (QMPError, OSError, EOFError, TimeoutError) as exc:
                raise HypervisorError("cannot query QEMU machine types", host=self.host,
                                      cause=str(exc) or type(exc).__name__) from exc
            finally:
                if pid is not None:
                    privileged.stop_pid(pid, timeout=5.0)
        names: set[str] = set()
        for machine in reply:
            names.add(str(machine["name"]))
            if machine.get("alias"):
                names.add(str(machine["alias"]))
        names.discard("none")
        return sorted(names)

    async def _query_machines(self, sock: str) -> Any:
        client = QMPClient("probe")
        await asyncio.wait_for(client.connect(sock), self.qmp_timeout)
        try:
            return await asyncio.wait_for(client.execute("query-machines"), self.qmp_timeout)
        finally:
            await asyncio.wait_for(client.disconnect(), 5.0)

    # ---- migration (qemu_migration) -----------------------------------------------------

    def migrate(self, name: str, uri: str, tuning: MigrationTuning) -> None:
        """Start migrating to ``uri`` (a destination started with the same ``incoming_uri``)
        with ``tuning``. Raises InputError unless ``uri`` is tcp:HOST:PORT, HypervisorError."""
        self.migration.migrate(name, uri, tuning)

    def migration_progress(self, name: str) -> MigrationProgress:
        return self.migration.progress(name)

    def wait_migration(self, name: str, *, timeout: float,
                       on_progress: ProgressCallback | None = None,
                       postcopy_after_s: float | None = None) -> MigrationProgress:
        return self.migration.wait(name, timeout=timeout, on_progress=on_progress,
                                   postcopy_after_s=postcopy_after_s)

    def start_postcopy(self, name: str) -> None:
        self.migration.start_postcopy(name)

    def continue_migration(self, name: str) -> None:
        self.migration.continue_(name)

    def pause_migration(self, name: str) -> None:
        self.migration.pause(name)

    def recover_incoming(self, name: str, uri: str) -> None:
        self.migration.recover(name, uri)

    def resume_migration(self, name: str, uri: str) -> None:
        self.migration.resume(name, uri)

    def cancel_migration(self, name: str, *, timeout: float = 15.0) -> None:
        self.migration.cancel(name, timeout=timeout)

    def events(self, name: str, *, after: int = 0, timeout: float = 0.0) -> list[GuestEvent]:
        return self.qmp.events(name, after=after, timeout=timeout)

    def wait_running(self, name: str, *, timeout: float = 30.0) -> None:
        """Wait until the guest runs, e.g. a migration destination after the switchover
        (it loads the last device state after the source reports completed).
        Raises WaitTimeout, or HypervisorError when its QEMU exits (a failed incoming
        migration ends the destination QEMU)."""
        def check() -> bool | None:
            return True if self.state(name) == GuestState.RUNNING else None

        self.qmp.wait_until(name, lambda: f"guest {name} to run", timeout,
                            ["RESUME", "MIGRATION"], check, interval=self.progress_interval)

    def resume(self, name: str) -> None:
        """``cont``: resume a paused guest; a running one is left alone."""
        if self.state(name) != GuestState.RUNNING:
            self._execute(name, "cont")

    def announce(self, name: str) -> None:
        """Have QEMU send RARP announcements of the guest's MAC (5 rounds over ~0.5 s)."""
        self._execute(name, "announce-self",
                      {"initial": 50, "max": 550, "rounds": 5, "step": 100})
