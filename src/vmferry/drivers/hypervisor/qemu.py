"""QEMU driver: disk-less lab guests under TCG, controlled over QMP with ``qemu.qmp``.

Each guest is one daemonized QEMU (it outlives the agent that started it). Everything of a
guest lives in ``run_dir`` under its name::

    <name>.pid         QEMU's pidfile: how a restarted agent finds its guests
    <name>.qmp         QMP unix socket
    <name>.serial.log  the guest console (look for "VMFERRY-READY name=...")
    <name>.spec.json   the GuestSpec it was started with

QMP runs on one asyncio loop in a private thread, shared by every ``QemuHypervisor`` of the
process (a QMP socket serves one client at a time, so one connection per guest is kept and
shared). The public methods are a synchronous facade over it; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import re
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import EventListener, QMPClient, QMPError, Runstate
from qemu.qmp.events import ListenerError
from qemu.qmp.qmp_client import ExecuteError

from vmferry import privileged
from vmferry.drivers.hypervisor.base import (
    GuestSpec,
    GuestState,
    Hypervisor,
    MigrationProgress,
    MigrationTuning,
    ProgressCallback,
)
from vmferry.errors import HypervisorError, InputError, SetupError, WaitTimeout
from vmferry.image.builder import GuestImage

__all__ = [
    "MIN_QEMU_VERSION",
    "QemuHypervisor",
    "guest_files",
    "kernel_append",
    "parse_kernel_append",
    "progress_from_query",
    "qemu_argv",
    "state_from_status",
]

MIN_QEMU_VERSION = (10, 0)
READY_MARKER = "VMFERRY-READY"
#: Migration statuses after which nothing more happens without a new command.
TERMINAL_MIGRATION_STATUSES = frozenset({"completed", "failed", "cancelled", "postcopy-paused"})

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_SUN_PATH_MAX = 107          # sockaddr_un.sun_path is 108 bytes with its NUL
_T = TypeVar("_T")


# ---- pure helpers (unit-tested) -----------------------------------------------------------------

SHORT_SOCKET_ROOT = Path("/run/vmferry")


def guest_files(run_dir: Path, name: str) -> dict[str, Path]:
    """Every file a guest may own in ``run_dir``, by role. The QMP socket moves to a short
    directory named after a hash of ``run_dir`` when ``run_dir`` is too long for a socket."""
    qmp = run_dir / f"{name}.qmp"
    if len(str(qmp)) > _SUN_PATH_MAX:
        digest = hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]
        qmp = SHORT_SOCKET_ROOT / f"qmp-{digest}" / f"{name}.qmp"
    return {
        "pid": run_dir / f"{name}.pid",
        "qmp": qmp,
        "serial": run_dir / f"{name}.serial.log",
        "spec": run_dir / f"{name}.spec.json",
    }


def validate_spec(spec: GuestSpec) -> None:
    """Reject specs that would break the command line or the file layout. Raises InputError."""
    if not _NAME_RE.match(spec.name):
        raise InputError("name", "1-63 characters: letters, digits, '_' and '-'", vm=spec.name)
    if not _MAC_RE.match(spec.mac.lower()):
        raise InputError("mac", f"not a MAC address: {spec.mac!r}", vm=spec.name)
    if int(spec.mac[:2], 16) & 1:
        raise InputError("mac", "multicast MAC (first octet is odd)", vm=spec.name)
    try:
        iface = ipaddress.ip_interface(spec.ip_cidr)
    except ValueError as exc:
        raise InputError("ip_cidr", f"not an address/prefix: {spec.ip_cidr!r}",
                         vm=spec.name) from exc
    if "/" not in spec.ip_cidr or iface.version != 4:
        raise InputError("ip_cidr", "an IPv4 address with prefix, e.g. 192.0.2.10/24",
                         vm=spec.name)
    if spec.gateway is not None:
        try:
            ipaddress.IPv4Address(spec.gateway)
        except ValueError as exc:
            raise InputError("gateway", f"not an IPv4 address: {spec.gateway!r}",
                             vm=spec.name) from exc
    if spec.memory_mib < 64:
        raise InputError("memory_mib", "at least 64", vm=spec.name)
    if spec.vcpus < 1:
        raise InputError("vcpus", "at least 1", vm=spec.name)
    if spec.workload_mibps < 0:
        raise InputError("workload_mibps", "0 or more", vm=spec.name)
    privileged.check_ifname(spec.tap)
    if not re.match(r"^[A-Za-z0-9_.-]+$", spec.machine):
        raise InputError("machine", f"not a machine type: {spec.machine!r}", vm=spec.name)


def kernel_append(spec: GuestSpec) -> str:
    """The kernel command line that gives the guest its identity (read by image/init.sh).

    ``panic=1`` with QEMU's ``-no-reboot``: a crashed guest ends its QEMU instead of looping."""
    words = ["console=ttyS0", "quiet", "panic=1", f"vmferry.name={spec.name}",
             f"vmferry.ip={spec.ip_cidr}"]
    if spec.gateway:
        words.append(f"vmferry.gw={spec.gateway}")
    words.append(f"vmferry.workload={spec.workload_mibps}")
    return " ".join(words)


def parse_kernel_append(append: str) -> dict[str, str]:
    """The ``vmferry.*`` parameters of a kernel command line, without the prefix."""
    params: dict[str, str] = {}
    for word in append.split():
        key, sep, value = word.partition("=")
        if sep and key.startswith("vmferry."):
            params[key.removeprefix("vmferry.")] = value
    return params


def qemu_argv(spec: GuestSpec, image: GuestImage, files: Mapping[str, Path], *,
              qemu_binary: str = "qemu-system-x86_64", incoming: bool = False) -> list[str]:
    """The QEMU command line of a guest. Source and destination of a migration must get the
    same one (apart from ``-incoming``): device layout and ROMs are part of the stream."""
    argv = [
        qemu_binary,
        "-name", f"guest={spec.name},process=vmferry-{spec.name}",
        "-accel", "tcg",
        "-cpu", "qemu64",
        "-machine", spec.machine,
        "-m", str(spec.memory_mib),
        "-smp", str(spec.vcpus),
        "-nographic", "-nodefaults", "-no-reboot",
        "-serial", f"file:{files['serial']}",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", kernel_append(spec),
        # vnet_hdr=off: no checksum/segmentation offload metadata on the tap, so frames
        # leave the guest complete; OVS's userspace (netdev) datapath would forward
        # partial-checksum frames as they are.
        "-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no,vnet_hdr=off",
        # romfile=: no iPXE, the kernel is loaded directly; it also keeps iPXE's banner off
        # the console.
        "-device", f"virtio-net-pci,netdev=n0,mac={spec.mac.lower()},romfile=",
        "-qmp", f"unix:{files['qmp']},server=on,wait=off",
        "-pidfile", str(files["pid"]),
        "-daemonize",
    ]
    if incoming:
        # Capabilities (postcopy-ram) must be set before the listener opens: migrate-incoming.
        argv += ["-incoming", "defer"]
    return argv


def state_from_status(status: str) -> GuestState:
    """GuestState for a QEMU RunState as reported by query-status."""
    return {
        "running": GuestState.RUNNING,
        "inmigrate": GuestState.INMIGRATE,
        "postmigrate": GuestState.POSTMIGRATE,
        "shutdown": GuestState.SHUTDOWN,
        "guest-panicked": GuestState.SHUTDOWN,
        "internal-error": GuestState.SHUTDOWN,
        "io-error": GuestState.SHUTDOWN,
    }.get(status, GuestState.PAUSED)


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _opt_int(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def progress_from_query(info: Mapping[str, Any]) -> MigrationProgress:
    """MigrationProgress from a query-migrate reply ({} before any migration: status none)."""
    ram = info.get("ram") or {}
    status = str(info.get("status", "none"))
    completed = status == "completed"
    extra: dict[str, object] = {k: ram[k] for k in (
        "normal", "duplicate", "normal-bytes", "precopy-bytes", "downtime-bytes",
        "postcopy-bytes", "postcopy-requests", "pages-per-second", "page-size") if k in ram}
    if "blocked-reasons" in info:
        extra["blocked_reasons"] = info["blocked-reasons"]
    return MigrationProgress(
        status=status,
        transferred_bytes=_int(ram.get("transferred")),
        remaining_bytes=_int(ram.get("remaining")),
        total_bytes=_int(ram.get("total")),
        dirty_pages_rate=_int(ram.get("dirty-pages-rate")),
        mbps=float(ram.get("mbps") or 0.0),
        expected_downtime_ms=_opt_int(info.get("expected-downtime")),
        downtime_ms=_opt_int(info.get("downtime")) if completed else None,
        total_time_ms=_opt_int(info.get("total-time")),
        setup_time_ms=_opt_int(info.get("setup-time")),
        cpu_throttle_percent=_int(info.get("cpu-throttle-percentage")),
        dirty_sync_count=_int(ram.get("dirty-sync-count")),
        error=str(info["error-desc"]) if info.get("error-desc") else None,
        extra=extra,
    )


def _version_from_text(text: str) -> str:
    match = re.search(r"version (\d+\.\d+(?:\.\d+)?)", text)
    if not match:
        raise HypervisorError("cannot parse the QEMU version", cause=text.strip()[:200])
    return match.group(1)


# ---- QMP plumbing -------------------------------------------------------------------------------

class _QmpHub:
    """One asyncio loop in a daemon thread holding one QMPClient per QMP socket path."""

    _instance: _QmpHub | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.clients: dict[str, QMPClient] = {}   # touched only on the loop thread
        self.locks: dict[str, asyncio.Lock] = {}
        thread = threading.Thread(target=self.loop.run_forever, name="vmferry-qmp", daemon=True)
        thread.start()

    @classmethod
    def get(cls) -> _QmpHub:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        """Run ``coro`` on the loop. The coroutine bounds itself; ``timeout`` is a backstop."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout + 5.0)
        except TimeoutError:
            future.cancel()
            raise

    async def client(self, path: str, timeout: float) -> QMPClient:
        lock = self.locks.setdefault(path, asyncio.Lock())
        async with lock:
            client = self.clients.get(path)
            if client is not None and client.runstate == Runstate.RUNNING:
                # The catch-all listener (it cannot be removed) queues events nobody reads.
                client.events.clear()
                return client
            if client is not None:
                await self._close(client)
            client = QMPClient(Path(path).stem)
            await asyncio.wait_for(client.connect(path), timeout)
            self.clients[path] = client
            return client

    async def drop(self, path: str) -> None:
        client = self.clients.pop(path, None)
        if client is not None:
            await self._close(client)

    @staticmethod
    async def _close(client: QMPClient) -> None:
        try:
            await asyncio.wait_for(client.disconnect(), 5.0)
        except (QMPError, OSError, EOFError, TimeoutError):
            pass   # the peer is gone or broken: the connection is discarded either way


# ---- the driver ---------------------------------------------------------------------------------

class QemuHypervisor(Hypervisor):
    """Runs lab guests as daemonized QEMU processes (TCG) in ``namespace`` (None: the current
    one), with their files in ``run_dir``. Library errors surface as HypervisorError;
    bounded waits that give up raise WaitTimeout."""

    def __init__(self, run_dir: Path, image: GuestImage, *,
                 qemu_binary: str = "qemu-system-x86_64", namespace: str | None = None,
                 host: str | None = None, qmp_timeout: float = 10.0,
                 progress_interval: float = 0.5) -> None:
        self.run_dir = Path(run_dir)
        self.image = image
        self.qemu_binary = qemu_binary
        self.namespace = namespace
        self.host = host or namespace
        self.qmp_timeout = qmp_timeout
        self.progress_interval = progress_interval
        self._hub = _QmpHub.get()
        self._version: str | None = None
        self._machines: list[str] | None = None

    # ---- files and processes --------------------------------------------------------------

    def files(self, name: str) -> dict[str, Path]:
        return guest_files(self.run_dir, name)

    def serial_log(self, name: str) -> Path:
        return self.files(name)["serial"]

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

    def spec(self, name: str) -> GuestSpec:
        """The GuestSpec a running guest was started with. Raises HypervisorError."""
        try:
            data = json.loads(self.files(name)["spec"].read_text())
            return GuestSpec(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise HypervisorError(f"no spec recorded for guest {name}", host=self.host,
                                  vm=name, cause=str(exc)) from exc

    def guests(self) -> list[str]:
        """Names of guests with a live QEMU, found from the pidfiles in run_dir."""
        if not self.run_dir.is_dir():
            return []
        names = (p.name.removesuffix(".pid") for p in self.run_dir.glob("*.pid"))
        return sorted(n for n in names if _NAME_RE.match(n) and self.pid(n) is not None)

    def start(self, spec: GuestSpec, *, incoming_uri: str | None = None,
              tuning: MigrationTuning | None = None) -> int:
        """Start a guest, or return the pid of the one already running under that name.

        With ``incoming_uri`` QEMU starts with ``-incoming defer``, gets the migration
        capabilities ``tuning`` needs (postcopy must be enabled on both sides) and then
        listens on the URI. Raises InputError for a bad spec, HypervisorError when QEMU
        fails to start or the tap is missing."""
        validate_spec(spec)
        existing = self.pid(spec.name)
        if existing is not None:
            return existing
        files = self.files(spec.name)
        if len(str(files["qmp"])) > _SUN_PATH_MAX:
            raise HypervisorError(f"run dir path too long for a unix socket: {files['qmp']}",
                                  host=self.host, vm=spec.name)
        if not privileged.link_exists(self.namespace, spec.tap):
            raise HypervisorError(f"tap {spec.tap} does not exist", host=self.host,
                                  vm=spec.name, cause="create it before starting the guest")
        self._remove_files(spec.name)   # leftovers of a guest that died
        self.run_dir.mkdir(parents=True, exist_ok=True)
        files["qmp"].parent.mkdir(parents=True, exist_ok=True)
        files["spec"].write_text(json.dumps(dataclasses.asdict(spec), indent=1) + "\n")
        argv = qemu_argv(spec, self.image, files, qemu_binary=self.qemu_binary,
                         incoming=incoming_uri is not None)
        try:
            # -daemonize: this returns once QEMU is initialized (QMP listening) or has failed.
            result = privileged.run_in_namespace(self.namespace, argv, timeout=60, check=False)
        except WaitTimeout:
            self._kill_and_clean(spec.name)
            raise
        pid = self.pid(spec.name)
        if result.returncode != 0 or pid is None:
            self._kill_and_clean(spec.name)
            raise HypervisorError(f"QEMU failed to start guest {spec.name}", host=self.host,
                                  vm=spec.name,
                                  cause=(result.stderr or result.stdout).strip()[-800:]
                                  or f"exit status {result.returncode}",
                                  argv=shlex.join(argv))
        if incoming_uri is not None:
            try:
                self._set_capabilities(spec.name, tuning or MigrationTuning(), incoming=True)
                self._execute(spec.name, "migrate-incoming", {"uri": incoming_uri})
            except Exception:
                self.stop(spec.name)
                raise
        return pid

    def stop(self, name: str) -> None:
        """Stop the guest's QEMU (SIGTERM, then SIGKILL) and remove its files (idempotent)."""
        self._kill_and_clean(name)

    def disconnect(self, name: str | None = None) -> None:
        """Close this process's QMP connection to a guest (None: to all of ``run_dir``'s).
        A QMP socket serves one client at a time; another process can connect after this.
        The next call that needs QMP reconnects."""
        names = [name] if name is not None else self.guests()
        for guest in names:
            try:
                self._hub.run(self._hub.drop(str(self.files(guest)["qmp"])), 10.0)
            except TimeoutError:
                pass    # _close bounds itself; nothing is left to wait for

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

    # ---- QMP ------------------------------------------------------------------------------

    def _execute(self, name: str, cmd: str, args: Mapping[str, object] | None = None,
                 timeout: float | None = None) -> Any:
        timeout = timeout or self.qmp_timeout
        path = str(self.files(name)["qmp"])

        async def execute() -> Any:
            client = await self._hub.client(path, timeout)
            return await client.execute(cmd, dict(args or {}))

        async def call() -> Any:
            # One bound for connecting (if needed) and the reply together.
            return await asyncio.wait_for(execute(), timeout)

        return self._bounded(name, f"QMP {cmd}", call(), timeout)

    def _bounded(self, name: str, what: str, coro: Coroutine[Any, Any, _T],
                 timeout: float) -> _T:
        """Run a QMP coroutine for guest ``name``, translating qemu.qmp errors."""
        if self.pid(name) is None:
            coro.close()
            raise HypervisorError(f"guest {name} is not running", host=self.host, vm=name,
                                  cause=f"no QEMU process for {what}")
        try:
            return self._hub.run(coro, timeout)
        except ExecuteError as exc:
            raise HypervisorError(f"{what} failed for guest {name}", host=self.host, vm=name,
                                  cause=str(exc), error_class=exc.error_class) from exc
        except TimeoutError as exc:
            self._hub.run(self._hub.drop(str(self.files(name)["qmp"])), 10.0)
            raise WaitTimeout(f"{what} reply from guest {name}", timeout, host=self.host,
                              vm=name) from exc
        except (QMPError, OSError, EOFError) as exc:
            self._hub.run(self._hub.drop(str(self.files(name)["qmp"])), 10.0)
            raise HypervisorError(f"{what}: QMP connection to guest {name} failed",
                                  host=self.host, vm=name, cause=str(exc) or type(exc).__name__
                                  ) from exc

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
            self._version = _version_from_text(result.stdout)
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
                reply = self._hub.run(self._query_machines(str(sock)), self.qmp_timeout)
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

    # ---- migration ------------------------------------------------------------------------

    def _set_capabilities(self, name: str, tuning: MigrationTuning, *, incoming: bool) -> None:
        caps = [{"capability": "events", "state": True},
                {"capability": "postcopy-ram", "state": tuning.postcopy}]
        if not incoming:
            caps.append({"capability": "auto-converge", "state": tuning.auto_converge})
        self._execute(name, "migrate-set-capabilities", {"capabilities": caps})

    def migrate(self, name: str, uri: str, tuning: MigrationTuning) -> None:
        """Set capabilities and parameters from ``tuning`` and start migrating to ``uri``
        (a destination started with the same ``incoming_uri``). Raises HypervisorError."""
        self._set_capabilities(name, tuning, incoming=False)
        # max-bandwidth is bytes/s; 0 turns QEMU's rate limit off (its default is 128 MiB/s).
        bandwidth = 0 if tuning.bandwidth_mbps is None else tuning.bandwidth_mbps * 125_000
        self._execute(name, "migrate-set-parameters", {
            "downtime-limit": tuning.max_downtime_ms,
            "max-bandwidth": bandwidth,
        })
        self._execute(name, "migrate", {"uri": uri})

    def migration_progress(self, name: str) -> MigrationProgress:
        return progress_from_query(self._execute(name, "query-migrate"))

    def _wait_until(self, name: str, what: Callable[[], str], timeout: float,
                    events: Sequence[str], check: Callable[[], _T | None], *,
                    on_timeout: Callable[[], None] | None = None) -> _T:
        """Call ``check`` until it returns something other than None: after each QMP event
        in ``events`` and at least every ``progress_interval`` seconds. After ``timeout``
        seconds calls ``on_timeout`` and raises WaitTimeout saying ``what()`` it waited for."""
        path = str(self.files(name)["qmp"])
        listener = EventListener(names=list(events))
        registered: list[QMPClient] = []

        async def listen() -> None:
            client = await self._hub.client(path, self.qmp_timeout)
            client.register_listener(listener)
            registered.append(client)

        async def next_event(wait: float) -> None:
            try:
                await asyncio.wait_for(listener.get(), wait)
            except TimeoutError:
                pass

        async def unlisten() -> None:
            for client in registered:
                try:
                    client.remove_listener(listener)
                except (ListenerError, ValueError):
                    pass    # already gone with its connection

        # Listen before the first check so no change falls between the two.
        self._bounded(name, "QMP event listener", listen(), self.qmp_timeout)
        deadline = time.monotonic() + timeout
        try:
            while True:
                result = check()
                if result is not None:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    if on_timeout is not None:
                        on_timeout()
                    raise WaitTimeout(what(), timeout, host=self.host, vm=name)
                wait = min(self.progress_interval, left)
                self._bounded(name, f"{'/'.join(events)} event", next_event(wait), wait)
        finally:
            try:
                self._hub.run(unlisten(), 5.0)
            except TimeoutError:
                pass

    def wait_migration(self, name: str, *, timeout: float,
                       on_progress: ProgressCallback | None = None,
                       postcopy_after_s: float | None = None) -> MigrationProgress:
        """Wait for the outgoing migration to end (completed, failed, cancelled, or
        postcopy-paused), woken by QMP MIGRATION events and polling query-migrate every
        ``progress_interval`` for ``on_progress``. Raises WaitTimeout after cancelling."""
        start = time.monotonic()
        postcopy_requested = False
        last = "none"

        def check() -> MigrationProgress | None:
            nonlocal postcopy_requested, last
            progress = self.migration_progress(name)
            last = progress.status
            if on_progress is not None:
                on_progress(progress)
            if progress.status in TERMINAL_MIGRATION_STATUSES or progress.status == "none":
                return progress
            if (postcopy_after_s is not None and not postcopy_requested
                    and progress.status == "active"
                    and time.monotonic() - start >= postcopy_after_s):
                # Fails unless postcopy-ram was enabled on both sides (MigrationTuning).
                self.start_postcopy(name)
                postcopy_requested = True
            return None

        return self._wait_until(
            name, lambda: f"migration of guest {name} to finish (was {last}; cancelled)",
            timeout, ["MIGRATION"], check, on_timeout=lambda: self.cancel_migration(name))

    def wait_running(self, name: str, *, timeout: float = 30.0) -> None:
        """Wait until the guest runs, e.g. a migration destination after the switchover
        (it loads the last device state after the source reports completed).
        Raises WaitTimeout, or HypervisorError when its QEMU exits (a failed incoming
        migration ends the destination QEMU)."""
        def check() -> bool | None:
            return True if self.state(name) == GuestState.RUNNING else None

        self._wait_until(name, lambda: f"guest {name} to run", timeout,
                         ["RESUME", "MIGRATION"], check)

    def start_postcopy(self, name: str) -> None:
        """``migrate-start-postcopy``. Raises HypervisorError when postcopy-ram was not enabled
        on both sides or the migration is not running."""
        self._execute(name, "migrate-start-postcopy")

    def cancel_migration(self, name: str, *, timeout: float = 15.0) -> None:
        """Cancel the outgoing migration and wait until it has stopped; the source keeps (or
        goes back to) running. Raises WaitTimeout if it does not stop in time."""
        self._execute(name, "migrate_cancel")
        deadline = time.monotonic() + timeout
        while True:
            status = self.migration_progress(name).status
            if status in TERMINAL_MIGRATION_STATUSES or status == "none":
                return
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"migration of guest {name} to cancel (status {status})",
                                  timeout, host=self.host, vm=name)
            # Cancelling ends with a MIGRATION event too, but it takes only milliseconds.
            time.sleep(0.05)

    def resume(self, name: str) -> None:
        """``cont``: resume a paused guest; a running one is left alone."""
        if self.state(name) != GuestState.RUNNING:
            self._execute(name, "cont")

    def announce(self, name: str) -> None:
        """Have QEMU send RARP announcements of the guest's MAC (5 rounds over ~0.5 s)."""
        self._execute(name, "announce-self",
                      {"initial": 50, "max": 550, "rounds": 5, "step": 100})

