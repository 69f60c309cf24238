"""One libvirt daemon per lab host that says ``hypervisor: libvirt``.

A root libvirtd keeps its state at fixed paths (/etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt, /var/log/libvirt). Each lab host's daemon runs in the host's network
namespace *and* a private mount namespace in which those paths are bind mounts of the host's
own directories under the lab, with its own UTS name and host UUID (libvirt refuses to
migrate to a host with its own UUID). Its socket lives outside the private paths, so the
host's agent reaches it as ``qemu+unix:///system?socket=...``; the daemons of two hosts reach
each other (peer-to-peer migration) over TCP on the migration network, where nothing else
listens. The domains' consoles and logs go to the host's guest directory (bound on
/var/log/libvirt/qemu), where the agent's driver reads them.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import time
import uuid
from pathlib import Path

from vmferry import privileged
from vmferry.errors import SetupError, WaitTimeout
from vmferry.lab.names import LabLayout
from vmferry.model.topology import Topology

__all__ = ["PRIVATE_PATHS", "LibvirtDaemon", "agent_args", "lab_daemon", "start_daemons",
           "stop_daemons"]

#: libvirt's fixed paths, each bound to a directory of the host's own (by role).
PRIVATE_PATHS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
                 "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}
SOCKET_NAME = "libvirt-sock"
SHORT_SOCKET_ROOT = Path("/run/vmferry")
SUN_PATH_MAX = 107
START_TIMEOUT = 60.0

# Root QEMU without the parts a lab namespace cannot give (cgroups, a mount namespace per
# guest, security labels); its stdio goes to a file, not to virtlogd (one daemon fewer).
# seccomp_sandbox stays at its default (1): QEMU runs with -sandbox like the QMP driver's.
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""


class LibvirtDaemon:
    """The libvirtd of one lab host: files under ``root``, process in ``namespace``."""

    def __init__(self, host: str, namespace: str, root: Path, *, console_dir: Path,
                 listen_address: str | None, cache_dir: Path | None = None) -> None:
        self.host = host
        # libvirt's cache of what the QEMU binary can do (probing it takes seconds under
        # TCG): one per lab, shared by identical hosts; libvirt replaces its files atomically.
        self.cache_dir = cache_dir or self.root_cache(root)
        self.namespace = namespace
        self.root = Path(root)
        self.console_dir = Path(console_dir)
        self.listen_address = listen_address

    @staticmethod
    def root_cache(root: Path) -> Path:
        return Path(root) / "cache"

    @property
    def pidfile(self) -> Path:
        return self.root / "libvirtd.pid"

    @property
    def socket_dir(self) -> Path:
        """Outside the private paths; a short directory when the lab's path is too long."""
        wanted = self.root / "sock"
        if len(str(wanted / SOCKET_NAME)) <= SUN_PATH_MAX:
            return wanted
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:16]
        return SHORT_SOCKET_ROOT / f"lv-{digest}"

    @property
    def uri(self) -> str:
        """How the host's agent connects to this daemon."""
        return f"qemu+unix:///system?socket={self.socket_dir / SOCKET_NAME}"

    def host_uuid(self) -> str:
        """Stable per lab host: the same lab built again gets the same UUIDs."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"vmferry-lab:{self.root}"))

    def running(self) -> bool:
        pid = privileged.read_pidfile(self.pidfile)
        return pid is not None and privileged.pid_alive(pid)

    def _write_config(self) -> Path:
        for role in PRIVATE_PATHS:
            self._source(role).mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.console_dir.mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc"
        lines = [f'unix_sock_dir = "{self.socket_dir}"', 'unix_sock_group = "root"',
                 'unix_sock_rw_perms = "0700"', 'auth_unix_rw = "none"',
                 'auth_unix_ro = "none"', f'host_uuid = "{self.host_uuid()}"',
                 "listen_tls = 0", f'log_outputs = "1:file:{self.root / "libvirtd.log"}"',
                 # Warnings, and the migration phases in full (what a failed run needs).
                 'log_filters = "1:qemu.qemu_migration 3:*"']
        if self.listen_address:
            # Peer-to-peer migration: the source's daemon opens qemu+tcp://DEST/system. Only
            # the lab's migration network carries it; a real site uses qemu+tls.
            lines += ["listen_tcp = 1", f'listen_addr = "{self.listen_address}"',
                      'auth_tcp = "none"']
        (etc / "libvirtd.conf").write_text("\n".join(lines) + "\n")
        (etc / "qemu.conf").write_text(QEMU_CONF)
        (etc / "libvirt.conf").write_text("")
        return etc / "libvirtd.conf"

    def _source(self, role: str) -> Path:
        return self.cache_dir if role == "cache" else self.root / role

    def warm(self) -> None:
        """Have the daemon probe QEMU now (libvirt does it on the first request)."""
        import libvirt
        libvirt.registerErrorHandler(lambda *_: None, None)
        try:
            conn = libvirt.open(self.uri)
            try:
                conn.getDomainCapabilities(None, "x86_64", None, "qemu", 0)
            finally:
                conn.close()
        except libvirt.libvirtError as exc:
            raise SetupError(f"libvirtd of {self.host} cannot probe QEMU: {exc}",
                             log=_tail(self.root / "libvirtd.log")) from exc

    def start(self) -> None:
        """Start the daemon (idempotent) and wait until its socket answers. Raises
        SetupError when libvirtd is missing or exits, WaitTimeout when it does not answer."""
        if self.running():
            return
        binary = shutil.which("libvirtd")
        if binary is None:
            raise SetupError("libvirtd is missing; run scripts/install-system-deps.sh")
        config = self._write_config()
        mounts = [f"mkdir -p {p} && mount --bind {shlex.quote(str(self._source(role)))} {p}"
                  for role, p in PRIVATE_PATHS.items()]
        mounts.append(f"mkdir -p {PRIVATE_PATHS['log']}/qemu && mount --bind "
                      f"{shlex.quote(str(self.console_dir))} {PRIVATE_PATHS['log']}/qemu")
        script = " && ".join([*mounts, f"hostname {shlex.quote(self.host)}",
                              f"exec {binary} {'--listen ' if self.listen_address else ''}"
                              f"--config {shlex.quote(str(config))} "
                              f"--pid-file {shlex.quote(str(self.pidfile))}"])
        argv = ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script]
        proc = privileged.spawn_in_namespace(self.namespace, argv,
                                             log_path=self.root / "libvirtd.out")
        socket = self.socket_dir / SOCKET_NAME
        deadline = time.monotonic() + START_TIMEOUT
        while not (socket.exists() and self.running()):
            if proc.poll() is not None:
                raise SetupError(f"libvirtd of {self.host} exited with {proc.returncode}",
                                 log=_tail(self.root / "libvirtd.out"))
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"libvirtd of {self.host} to open {socket}", START_TIMEOUT)
            time.sleep(0.1)     # the daemon announces nothing but its socket

    def stop(self) -> list[str]:
        """Stop the daemon and every QEMU it started; remove its socket directory."""
        return stop_daemons([self.root])


def lab_daemon(layout: LabLayout, topology: Topology, host: str) -> LibvirtDaemon:
    """The daemon of a lab host: under the host's directory, consoles in its guest dir."""
    return LibvirtDaemon(host, layout.namespace(host), layout.host_dir(host) / "libvirt",
                         console_dir=layout.guest_run_dir(host),
                         listen_address=topology.migration_address(host).split("/")[0],
                         cache_dir=layout.root / "libvirt-cache")


def start_daemons(layout: LabLayout, topology: Topology) -> None:
    """Start the daemon of every host with ``hypervisor: libvirt`` (after the migration
    network: each listens on its host's address there)."""
    warmed = False
    for host in topology.hosts:
        if host.hypervisor == "libvirt":
            daemon = lab_daemon(layout, topology, host.name)
            daemon.start()
            if not warmed:     # the first fills the shared cache; the others read it
                daemon.warm()
                warmed = True


def agent_args(layout: LabLayout, topology: Topology, host: str) -> list[str]:
    """The agent's options that choose its hypervisor driver."""
    if topology.host(host).hypervisor != "libvirt":
        return []
    daemon = lab_daemon(layout, topology, host)
    return ["--hypervisor", "libvirt", "--libvirt-uri", daemon.uri,
            "--libvirt-console-dir", str(daemon.console_dir)]


def stop_daemons(roots: list[Path]) -> list[str]:
    """Stop the libvirtd of each daemon root and the QEMUs it left (their pidfiles are in the
    daemon's run/qemu); works from what is on disk, so it also cleans a half-built lab."""
    removed: list[str] = []
    for root in roots:
        pid = privileged.read_pidfile(root / "libvirtd.pid")
        if pid is not None and privileged.pid_alive(pid):
            privileged.stop_pid(pid, timeout=10.0)
            removed.append(f"libvirtd {root.parent.name} ({pid})")
        for pidfile in sorted((root / "run" / "qemu").glob("*.pid")):
            qemu = privileged.read_pidfile(pidfile)
            if qemu is not None and privileged.pid_alive(qemu) and privileged.is_qemu(qemu):
                privileged.stop_pid(qemu)
                removed.append(f"qemu {pidfile.stem} ({qemu})")
        daemon = LibvirtDaemon(root.parent.name, "", root, console_dir=root,
                               listen_address=None)
        if daemon.socket_dir.exists():
            shutil.rmtree(daemon.socket_dir, ignore_errors=True)
    return removed



def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
