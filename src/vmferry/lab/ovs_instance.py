"""A private Open vSwitch (one ovsdb-server + one ovs-vswitchd) for one lab node.

Every file of the instance lives under ``base_dir``: the database, its socket, pidfiles, logs,
unixctl sockets and the ``<bridge>.mgmt`` OpenFlow sockets of its bridges (``OVS_RUNDIR``).
The daemons run detached inside the node's network namespace, so they outlive the Python
process that started them; a later process rebuilds an ``OvsInstance`` from the same arguments
and finds them again through their pidfiles.

    inst = OvsInstance("sw1", "lab-sw1", Path("/tmp/lab/sw1"))
    inst.start()
    with inst.softswitch() as switch:
        switch.ensure_bridge("br0")
    inst.stop()
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import time
from pathlib import Path

from vmferry import privileged
from vmferry.drivers.softswitch.ovs import OvsSoftswitch
from vmferry.errors import PrivilegedError, SoftswitchError, WaitTimeout

LOG = logging.getLogger(__name__)

VSWITCH_SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")

# A sun_path holds 107 bytes plus NUL. The longest socket an instance gets is
# "<base_dir>/<bridge>.snoop" with a bridge name of up to 15 characters.
UNIX_PATH_MAX = 107
MAX_BASE_DIR = UNIX_PATH_MAX - len("/") - privileged.IFNAME_MAX - len(".snoop")
SHORT_RUN_ROOT = Path("/run/vmferry")


class OvsInstance:
    """One ovsdb-server + ovs-vswitchd pair, all files under ``base_dir``, run in ``namespace``.

    Its unix sockets live in ``base_dir`` too, unless that path is too long for a socket
    (107 bytes): then they go to a short directory under ``SHORT_RUN_ROOT`` named after a hash
    of ``base_dir``, so any process can find them again and ``stop()`` removes it.
    """

    def __init__(self, name: str, namespace: str | None, base_dir: Path) -> None:
        self.name = name
        self.namespace = namespace
        self.base_dir = Path(base_dir).absolute()
        if len(str(self.base_dir).encode()) > MAX_BASE_DIR:
            digest = hashlib.sha1(str(self.base_dir).encode()).hexdigest()[:16]
            self._rundir = SHORT_RUN_ROOT / f"ovs-{digest}"
        else:
            self._rundir = self.base_dir

    # ---- paths ---------------------------------------------------------------------------------

    @property
    def rundir(self) -> Path:
        """Where the sockets are: ``base_dir``, or a short directory when that is too long."""
        return self._rundir

    @property
    def db_path(self) -> Path:
        return self.base_dir / "conf.db"

    @property
    def db_socket(self) -> Path:
        return self.rundir / "db.sock"

    @property
    def vswitchd_ctl(self) -> Path:
        """The unixctl socket of ovs-vswitchd (``ovs-appctl -t`` target)."""
        return self.rundir / "ovs-vswitchd.ctl"

    @property
    def ovsdb_ctl(self) -> Path:
        return self.rundir / "ovsdb-server.ctl"

    def _pidfile(self, daemon: str) -> Path:
        return self.base_dir / f"{daemon}.pid"

    def _env(self) -> dict[str, str]:
        # Bridges put their .mgmt/.snoop sockets in OVS_RUNDIR.
        where = str(self.base_dir)
        return {"OVS_RUNDIR": str(self.rundir), "OVS_LOGDIR": where, "OVS_DBDIR": where}

    # ---- state ---------------------------------------------------------------------------------

    def _pid(self, daemon: str) -> int | None:
        """The pid in the daemon's pidfile if that process is alive and is this instance's."""
        pid = privileged.read_pidfile(self._pidfile(daemon))
        if pid is None or not privileged.pid_alive(pid):
            return None
        # A stale pidfile may name a recycled pid: only claim a process whose command line
        # names our own files.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if not cmdline or Path(cmdline[0].decode(errors="replace")).name != daemon:
            return None
        if not any(str(self.base_dir).encode() in arg for arg in cmdline):
            return None
        return pid

    def pids(self) -> dict[str, int]:
        """Live daemons of this instance, by daemon name."""
        found = {d: self._pid(d) for d in ("ovsdb-server", "ovs-vswitchd")}
        return {d: pid for d, pid in found.items() if pid is not None}

    def running(self) -> bool:
        """True when both daemons of this instance are alive."""
        return len(self.pids()) == 2

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 15) -> None:
        """Start both daemons and wait until ovs-vswitchd answers. No-op if already running.

        A half-running instance (one daemon dead) is stopped and started again; the database
        is kept. Raises ``SoftswitchError`` if a daemon fails to start, ``WaitTimeout`` if
        ovs-vswitchd does not answer within ``timeout`` seconds.
        """
        if self.running():
            return
        self._stop_daemons()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.rundir.mkdir(parents=True, exist_ok=True)
        if not self.db_path.exists():
            self._create_db()
        deadline = time.monotonic() + timeout
        common = ["-vconsole:off", "--detach"]
        # --detach returns once the daemon is initialized: the db socket listens by then.
        self._run([
            "ovsdb-server", str(self.db_path),
            f"--remote=punix:{self.db_socket}",
            f"--pidfile={self._pidfile('ovsdb-server')}",
            f"--log-file={self.base_dir / 'ovsdb-server.log'}",
            f"--unixctl={self.ovsdb_ctl}", *common,
        ], timeout)
        self._run([
            "ovs-vswitchd", f"unix:{self.db_socket}",
            f"--pidfile={self._pidfile('ovs-vswitchd')}",
            f"--log-file={self.base_dir / 'ovs-vswitchd.log'}",
            f"--unixctl={self.vswitchd_ctl}", *common,
        ], max(deadline - time.monotonic(), 1.0))
        self._wait_vswitchd(deadline, timeout)
        LOG.info("Open vSwitch %s started in %s (%s)", self.name, self.namespace, self.base_dir)

    def stop(self) -> None:
        """Stop both daemons (by pid) and remove ``base_dir``. Idempotent."""
        self._stop_daemons()
        shutil.rmtree(self.base_dir, ignore_errors=True)
        if self.rundir != self.base_dir:
            shutil.rmtree(self.rundir, ignore_errors=True)

    def softswitch(self, timeout: float = 10) -> OvsSoftswitch:
        """A connected ``OvsSoftswitch`` for this instance; close it when done.

        Raises ``SoftswitchError`` if the instance is not running.
        """
        if not self.running():
            raise SoftswitchError(f"Open vSwitch {self.name} is not running", host=self.name)
        return OvsSoftswitch(self.db_socket, rundir=self.rundir,
                             vswitchd_ctl=self.vswitchd_ctl, timeout=timeout)

    # ---- helpers -------------------------------------------------------------------------------

    def _stop_daemons(self) -> None:
        # vswitchd first: it is the database's client.
        for daemon in ("ovs-vswitchd", "ovsdb-server"):
            pid = self._pid(daemon)
            if pid is not None:
                privileged.stop_pid(pid)

    def _create_db(self) -> None:
        if not VSWITCH_SCHEMA.exists():
            raise SoftswitchError("Open vSwitch schema not installed", host=self.name,
                                  cause=f"{VSWITCH_SCHEMA} is missing")
        tmp = self.db_path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        self._tool(["ovsdb-tool", "create", str(tmp), str(VSWITCH_SCHEMA)])
        # ovs-vswitchd and ovsdbapp both need the one root row that `ovs-vsctl init` would add.
        # Userspace TSO makes the netdev datapath read veths and taps with their offload
        # metadata: without it a checksum left to the NIC (veth, or a guest's virtio-net) is
        # forwarded unfinished and TCP/UDP is dropped by the receiver. Read at daemon start.
        other_config = ["map", [["userspace-tso-enable", "true"]]]
        root = [{"op": "insert", "table": "Open_vSwitch", "row": {"other_config": other_config}}]
        self._tool(["ovsdb-tool", "transact", str(tmp), json.dumps(["Open_vSwitch", *root])])
        tmp.rename(self.db_path)
        (tmp.parent / f".{tmp.name}.~lock~").unlink(missing_ok=True)     # left by ovsdb-tool

    def _tool(self, argv: list[str]) -> None:
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                    check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SoftswitchError(f"{argv[0]} {argv[1]} failed", host=self.name,
                                  cause=str(exc)) from exc
        if result.returncode != 0:
            raise SoftswitchError(f"{argv[0]} {argv[1]} failed", host=self.name,
                                  cause=(result.stderr or result.stdout).strip()[-500:])

    def _run(self, argv: list[str], timeout: float) -> None:
        try:
            privileged.run_in_namespace(self.namespace, argv, timeout=timeout, env=self._env())
        except PrivilegedError as exc:
            raise SoftswitchError(f"cannot start {argv[0]} of Open vSwitch {self.name}",
                                  host=self.name, cause=exc.fields.get("cause")) from exc

    def _wait_vswitchd(self, deadline: float, timeout: float) -> None:
        last = ""
        while True:
            try:
                result = subprocess.run(
                    ["ovs-appctl", "-t", str(self.vswitchd_ctl), "version"],
                    capture_output=True, text=True, check=False,
                    timeout=max(deadline - time.monotonic(), 0.5))
                if result.returncode == 0:
                    return
                last = result.stderr.strip()
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"ovs-vswitchd of {self.name} to answer on {self.vswitchd_ctl}",
                                  timeout, host=self.name, cause=last or None)
            time.sleep(0.05)
