"""Helpers for tests that drive a whole lab through the real `vmferry` command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from vmferry import privileged

VMFERRY = [sys.executable, "-m", "vmferry"]
IMAGE_DIR = "/var/lib/vmferry/images"   # shared by every test run: building it takes a while


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LabRun:
    """A lab brought up in its own state directory, driven through the CLI."""

    def __init__(self, state_dir: Path, topology: dict[str, Any]) -> None:
        self.state_dir = state_dir
        self.topology = topology
        self.name = topology["name"]
        self.port = free_port()
        self.topology_file = state_dir / "topology.yaml"
        self.env = {**os.environ, "VMFERRY_STATE_DIR": str(state_dir),
                    "VMFERRY_IMAGE_DIR": os.environ.get("VMFERRY_IMAGE_DIR", IMAGE_DIR)}

    def cli(self, *args: str, check: bool = True, timeout: float = 300,
            ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*VMFERRY, *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"vmferry {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def up(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.topology_file.write_text(yaml.safe_dump(self.topology))
        self.cli("lab", "up", "--topology", str(self.topology_file),
                 "--controller-port", str(self.port), timeout=600)

    def down(self) -> None:
        self.cli("lab", "down", "--lab", self.name, check=False, timeout=120)

    def namespace(self, node: str) -> str:
        return f"vf-{self.name}-{node}"

    def exec(self, node: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.namespace(node), *argv],
                              capture_output=True, text=True, timeout=timeout)

    def pings(self, node: str, address: str, count: int = 3) -> bool:
        return self.exec(node, "ping", "-c", str(count), "-W", "1", "-i", "0.2",
                         address).returncode == 0

    def wait_ping(self, node: str, address: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pings(node, address, count=1):
                return True
            time.sleep(0.5)
        return False

    def http(self, node: str, url: str, timeout: float = 5) -> str | None:
        result = self.exec(node, "curl", "-s", "-m", str(timeout), url, timeout=timeout + 5)
        return result.stdout if result.returncode == 0 else None


def default_topology(name: str) -> dict[str, Any]:
    """The default two-rack topology under another lab name (namespaces vf-NAME-*)."""
    from vmferry.model.topology import default_topology_path
    data: dict[str, Any] = yaml.safe_load(default_topology_path().read_text())
    data["name"] = name
    return data


@contextmanager
def running_lab(state_dir: Path, topology: dict[str, Any]) -> Iterator[LabRun]:
    """A lab that is up for the ``with`` block, then down with nothing of it left."""
    lab = LabRun(state_dir, topology)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()
        assert leftovers(lab.name, state_dir) == []


def leftovers(lab_name: str, state_dir: Path) -> list[str]:
    """Anything of the lab still on the machine: namespaces, processes, files."""
    found: list[str] = []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"namespace {line.split()[0]}" for line in namespaces.splitlines()
              if line.startswith(f"vf-{lab_name}-")]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # The state directory is under pytest's tmp dir: only this process is to be ignored.
        if str(state_dir) in cmdline and int(proc.name) != os.getpid():
            found.append(f"process {proc.name}: {cmdline[:120]}")
    lab_dir = state_dir / "labs" / lab_name
    if lab_dir.exists():
        found.append(f"directory {lab_dir}")
    return found


def lab_dir(lab: LabRun) -> Path:
    return lab.state_dir / "labs" / lab.name


def kill_controller(lab: LabRun) -> None:
    """SIGKILL the lab's controller and wait (bounded) until it is gone."""
    pid = int(json.loads((lab_dir(lab) / "lab.json").read_text())["pids"]["controller"])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while privileged.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not privileged.pid_alive(pid)


def restart_controller(lab: LabRun, failpoint: str | None = None,
                       release: Path | None = None) -> None:
    """`lab up` restarts what died (controller, agents); the failpoint (and the file that
    releases its hold) travel in its environment."""
    env = {k: v for k, v in lab.env.items()
           if k not in ("VMFERRY_FAILPOINTS", "VMFERRY_FAILPOINTS_RELEASE")}
    if failpoint:
        env["VMFERRY_FAILPOINTS"] = failpoint
    if release is not None:
        env["VMFERRY_FAILPOINTS_RELEASE"] = str(release)
    saved, lab.env = lab.env, env
    try:
        lab.cli("lab", "up", "--topology", str(lab.topology_file), "--controller-port",
                str(lab.port), timeout=300)
    finally:
        lab.env = saved


# ---- a lab whose controller keeps its store in PostgreSQL -----------------------------------

PG_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "postgres-test-server.sh"
PG_BIN = Path(os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin"))


class PostgresCluster:
    """A private PostgreSQL 15 cluster (scripts/postgres-test-server.sh) for a lab's store,
    run as user postgres; it can be stopped and started again on the same port and socket."""

    def __init__(self) -> None:
        missing = [tool for tool in ("initdb", "pg_ctl") if not (PG_BIN / tool).exists()]
        if missing:
            # The figures of issue 11 rest on it: a missing PostgreSQL fails, never skips.
            raise AssertionError(f"PostgreSQL 15 missing at {PG_BIN} ({', '.join(missing)}): "
                                 "run scripts/install-system-deps.sh")
        self.base = Path(tempfile.mkdtemp(prefix="vmferry-labpg."))
        self.base.chmod(0o711)          # user postgres must reach its directory below
        self.dir = self.base / "pg"
        self.url = ""

    def start(self) -> str:
        """Create and start the cluster; its database URL."""
        result = subprocess.run(["bash", str(PG_SCRIPT), "start", str(self.dir)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise AssertionError(f"private PostgreSQL did not start:\n{result.stderr}")
        self.url = result.stdout.strip().splitlines()[-1]
        return self.url

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D",
                        str(self.dir / "data"), "-w", "-t", "30", *args], check=True,
                       capture_output=True, timeout=60)

    def stop_server(self) -> None:
        """``pg_ctl stop -m fast``: every connection is closed, new ones are refused."""
        self._pg_ctl("-m", "fast", "stop")

    def start_server(self) -> None:
        """Start it again with the options postgres-test-server.sh gave it."""
        port = (self.dir / "port").read_text().strip()
        self._pg_ctl("-l", str(self.dir / "server.log"), "-o",
                     f"-k {self.dir} -p {port} -h 127.0.0.1 -F -c fsync=off "
                     "-c full_page_writes=off", "start")

    def remove(self) -> None:
        subprocess.run(["bash", str(PG_SCRIPT), "stop", str(self.dir)], capture_output=True,
                       timeout=60, check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def trunks(lab: LabRun) -> dict[tuple[str, str], dict[str, Any]]:
    """``fabric show`` keyed by the trunk's two ends."""
    return {(t["a"], t["b"]): t for t in lab.json("fabric", "show")}


def guest_traces(lab: LabRun, host: str, vm: str) -> list[str]:
    """What of ``vm`` is on ``host``: its tap, its OVS port, its guest files."""
    found = []
    if f"vm-{vm}" in lab.exec(host, "ip", "-o", "link").stdout:
        found.append("tap")
    db = lab.state_dir / "labs" / lab.name / "ovs" / host / "db.sock"
    ports = subprocess.run(["ovs-vsctl", f"--db=unix:{db}", "list-ports", "br-vm"],
                           capture_output=True, text=True, timeout=10).stdout
    if f"vm-{vm}" in ports:
        found.append("ovs-port")
    guests = lab.state_dir / "labs" / lab.name / "hosts" / host / "guests"
    if list(guests.glob(f"{vm}.*")):
        found.append("guest-files")
    return found
