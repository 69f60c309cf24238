"""The guest image and the QEMU driver on real QEMU (TCG), taps, bridges and namespaces.

Lab of this module (namespaces ``vfqt-<run>-*``; nothing else is touched)::

    client (192.0.2.1/24) ── fabric: br0 ──┬── a: br0 ── tap → guest QEMU (source)
                                           └── b: br0 ── tap → guest QEMU (destination)
    a mig0 198.51.100.1/30 ─── veth ─── b mig0 198.51.100.2/30   (the migration network)

Traffic goes only to addresses inside these namespaces (RFC 5737 ranges); every loop is
bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from vmferry import pki, privileged
from vmferry.drivers.hypervisor.base import GuestEvent, GuestSpec, GuestState, MigrationTuning
from vmferry.drivers.hypervisor.qemu import QemuHypervisor
from vmferry.errors import HypervisorError, InputError, WaitTimeout
from vmferry.image.builder import GuestImage, ensure_image

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: QEMU on taps in namespaces"),
]

IMAGE_DIR = "/var/lib/vmferry/images"   # shared with every other run: building takes a while
PREFIX = f"vfqt-{os.getpid() % 100000}"
CLIENT_IP = "192.0.2.1"
MIG_A, MIG_B = "198.51.100.1", "198.51.100.2"
MEMORY_MIB = 256
BOOT_TIMEOUT = 60.0


# ---- lab plumbing (test-only helpers; the product's privileged ops live in privileged.py) ----

def add_bridge(namespace: str, name: str) -> None:
    with IPRoute(netns=namespace) as ipr:
        if not ipr.link_lookup(ifname=name):
            ipr.link("add", ifname=name, kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")


def enslave(namespace: str, ifname: str, bridge: str) -> None:
    with IPRoute(netns=namespace) as ipr:
        master = ipr.link_lookup(ifname=bridge)[0]
        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], master=master, state="up")


def socket_in(namespace: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket of ``namespace``. setns() moves only the calling thread, so a throwaway
    thread enters the namespace and makes the socket; the socket stays in it."""
    made: list[socket.socket] = []
    failed: list[OSError] = []

    def make() -> None:
        try:
            netns.setns(namespace, flags=0)
            made.append(socket.socket(socket.AF_INET, kind))
        except OSError as exc:   # re-raised in the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join(10)
    if failed:
        raise failed[0]
    assert made, f"could not make a socket in {namespace}"
    return made[0]


def http_get(namespace: str, ip: str, port: int, timeout: float = 10.0) -> str:
    with socket_in(namespace) as sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        chunks = []
        for _ in range(1000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).decode(errors="replace").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.") and " 200 " in head.splitlines()[0], head
    return body


def ping(namespace: str, ip: str, count: int = 3) -> None:
    result = privileged.run_in_namespace(
        namespace, ["ping", "-c", str(count), "-i", "0.2", "-W", "2", "-w", "15", ip],
        timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


class EchoSession:
    """One TCP connection to the guest's echo port, held open by the test."""

    def __init__(self, namespace: str, ip: str) -> None:
        self.sock = socket_in(namespace)
        self.sock.settimeout(10.0)
        self.sock.connect((ip, 7))
        self.count = 0

    def echo(self) -> None:
        self.count += 1
        line = f"vmferry echo {self.count}\n".encode()
        self.sock.sendall(line)
        got = b""
        deadline = time.monotonic() + 10
        while len(got) < len(line) and time.monotonic() < deadline:
            chunk = self.sock.recv(len(line) - len(got))
            assert chunk, "echo connection closed"
            got += chunk
        assert got == line

    def close(self) -> None:
        self.sock.close()


class Pinger:
    """ping every 10 ms in the background (bounded by count and deadline)."""

    def __init__(self, namespace: str, ip: str, count: int = 1000) -> None:
        argv = privileged.netns_argv(namespace, ["ping", "-q", "-i", "0.01", "-W", "1",
                                                 "-c", str(count), "-w", "30", ip])
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)

    def lost(self) -> int:
        """Stop pinging; the number of replies missing."""
        if self.proc.poll() is None:
            self.proc.send_signal(2)      # SIGINT: ping prints its summary
        out, _ = self.proc.communicate(timeout=40)
        for line in out.splitlines():
            if "packets transmitted" in line:
                sent = int(line.split()[0])
                received = int(line.split(",")[1].split()[0])
                return sent - received
        raise AssertionError(f"no ping summary: {out}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestImage]:
    saved = {k: os.environ.get(k) for k in ("VMFERRY_STATE_DIR", "VMFERRY_IMAGE_DIR")}
    os.environ["VMFERRY_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    os.environ.setdefault("VMFERRY_IMAGE_DIR", IMAGE_DIR)
    try:
        yield ensure_image()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class Lab:
    root: Path
    image: GuestImage
    a: QemuHypervisor = field(init=False)
    b: QemuHypervisor = field(init=False)
    client: str = f"{PREFIX}-c"
    fabric: str = f"{PREFIX}-f"
    ns_a: str = f"{PREFIX}-a"
    ns_b: str = f"{PREFIX}-b"
    _guests: int = 0

    def __post_init__(self) -> None:
        self.a = QemuHypervisor(self.root / "a", self.image, namespace=self.ns_a)
        self.b = QemuHypervisor(self.root / "b", self.image, namespace=self.ns_b)

    def namespaces(self) -> list[str]:
        return [self.client, self.fabric, self.ns_a, self.ns_b]

    def build(self) -> None:
        for ns in self.namespaces():
            privileged.create_namespace(ns)
        add_bridge(self.fabric, "br0")
        for host, ns in (("a", self.ns_a), ("b", self.ns_b)):
            add_bridge(ns, "br0")
            privileged.create_veth(ns, "up0", self.fabric, f"up-{host}")
            enslave(ns, "up0", "br0")
            enslave(self.fabric, f"up-{host}", "br0")
        privileged.create_veth(self.client, "eth0", self.fabric, "up-c")
        enslave(self.fabric, "up-c", "br0")
        privileged.add_address(self.client, "eth0", f"{CLIENT_IP}/24")
        privileged.create_veth(self.ns_a, "mig0", self.ns_b, "mig0")
        privileged.add_address(self.ns_a, "mig0", f"{MIG_A}/30")
        privileged.add_address(self.ns_b, "mig0", f"{MIG_B}/30")

    def new_guest(self, workload_mibps: int = 0) -> GuestSpec:
        """A fresh guest identity with its tap on both hosts' bridges (the destination port
        exists before the migration, as vmferry presets it)."""
        self._guests += 1
        n = self._guests
        spec = GuestSpec(name=f"qt{n}", memory_mib=MEMORY_MIB, mac=f"52:54:00:7f:00:{n:02x}",
                         tap=f"tap{n}", ip_cidr=f"192.0.2.{10 + n}/24",
                         workload_mibps=workload_mibps)
        for ns in (self.ns_a, self.ns_b):
            privileged.create_tap(ns, spec.tap)
            enslave(ns, spec.tap, "br0")
        return spec

    def teardown(self) -> None:
        for hv in (self.a, self.b):
            for name in hv.guests():
                hv.stop(name)
        for ns in self.namespaces():
            privileged.delete_namespace(ns)


@pytest.fixture(scope="module")
def lab(image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    # A short root: QMP unix socket paths must stay under 108 bytes.
    lab = Lab(tmp_path_factory.mktemp("qt"), image)
    try:
        lab.build()
        yield lab
    finally:
        lab.teardown()
    assert not set(lab.namespaces()) & set(privileged.list_namespaces())


@pytest.fixture
def guest(lab: Lab, request: pytest.FixtureRequest) -> Iterator[GuestSpec]:
    """A guest booted on host a, stopped on both hosts (and its files gone) afterwards."""
    workload = getattr(request, "param", 0)
    spec = lab.new_guest(workload_mibps=workload)
    with ExitStack() as cleanup:
        cleanup.callback(lab.b.stop, spec.name)
        cleanup.callback(lab.a.stop, spec.name)
        lab.a.start(spec)
        lab.a.wait_ready(spec.name, timeout=BOOT_TIMEOUT)
        yield spec
    for hv in (lab.a, lab.b):
        assert not list(hv.run_dir.glob(f"{spec.name}.*")), "guest files left behind"


def ip_of(spec: GuestSpec) -> str:
    return spec.ip_cidr.split("/")[0]


# ---- tests ------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_guest_boots_and_serves(lab: Lab, guest: GuestSpec) -> None:
    ip = ip_of(guest)
    ping(lab.client, ip)
    assert http_get(lab.client, ip, 80).strip() == f"vmferry guest {guest.name} port 80"
    assert http_get(lab.client, ip, 8080).strip() == f"vmferry guest {guest.name} port 8080"
    session = EchoSession(lab.client, ip)
    try:
        for _ in range(3):
            session.echo()
    finally:
        session.close()
    assert lab.a.state(guest.name) is GuestState.RUNNING
    assert lab.b.state(guest.name) is GuestState.ABSENT


RESTARTED_AGENT = """
import json, sys
from pathlib import Path
from vmferry.drivers.hypervisor.qemu import QemuHypervisor
from vmferry.image.builder import cached_image
hv = QemuHypervisor(Path(sys.argv[1]), cached_image(), namespace=sys.argv[2])
hv.connect()
found = {n: [hv.state(n).value, hv.spec(n).ip_cidr] for n in hv.guests()}
# Events still flow after the restart: the new connection records where things stand,
# then what happens from now on.
events = []
for name in found:
    seen = hv.events(name)
    hv.qmp.execute(name, "stop")
    hv.qmp.execute(name, "cont")
    while not any(e.kind == "RESUME" for e in seen):
        more = hv.events(name, after=seen[-1].seq, timeout=10.0)
        assert more, "no event within 10 s"
        seen += more
    events = [[e.kind, e.status] for e in seen]
hv.disconnect()
print(json.dumps({"guests": found, "events": events}))
"""


@pytest.mark.timeout(120)
def test_restarted_agent_finds_its_guests(lab: Lab, guest: GuestSpec) -> None:
    assert lab.a.state(guest.name) is GuestState.RUNNING
    # QMP serves one client at a time: a restarted agent connects once the old one is gone.
    lab.a.disconnect()
    result = subprocess.run([sys.executable, "-c", RESTARTED_AGENT, str(lab.a.run_dir),
                             lab.ns_a], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "guests": {guest.name: ["running", guest.ip_cidr]},
        "events": [["VMFERRY_RESYNC", "none"], ["STOP", None], ["RESUME", None]]}
    assert lab.a.start(guest) == lab.a.pid(guest.name)   # idempotent
    assert lab.a.state(guest.name) is GuestState.RUNNING


@pytest.mark.timeout(60)
def test_version_and_machine_types(lab: Lab) -> None:
    major, minor = (int(p) for p in lab.a.version().split(".")[:2])
    assert (major, minor) >= (10, 0)
    lab.a.check_setup()
    machines = lab.a.machine_types()
    assert "q35" in machines and "pc" in machines


@pytest.mark.timeout(180)
@pytest.mark.parametrize("guest", [0, 5], indirect=True, ids=["idle", "workload5"])
def test_live_migration_keeps_guest_and_connection(lab: Lab, guest: GuestSpec) -> None:
    ip = ip_of(guest)
    if guest.workload_mibps:
        # The workload fills its working set first; then the migration has dirty memory to
        # chase.
        lab.a.wait_console(guest.name, "VMFERRY-WORKLOAD", timeout=60)
    session = EchoSession(lab.client, ip)
    pinger = None
    try:
        session.echo()
        uri = f"tcp:{MIG_B}:49152"
        tuning = MigrationTuning(max_downtime_ms=300)
        lab.b.start(guest, incoming_uri=uri, tuning=tuning)
        assert lab.b.state(guest.name) is GuestState.INMIGRATE
        pinger = Pinger(lab.client, ip)
        started = time.monotonic()
        lab.a.migrate(guest.name, uri, tuning)
        seen: list[str] = []
        progress = lab.a.wait_migration(guest.name, timeout=90,
                                        on_progress=lambda p: seen.append(p.status))
        lab.b.wait_running(guest.name, timeout=30)
        took = time.monotonic() - started
        lab.b.announce(guest.name)
        assert progress.status == "completed", progress
        assert progress.downtime_ms is not None and progress.total_time_ms is not None
        assert progress.transferred_bytes > 0
        assert lab.a.state(guest.name) is GuestState.POSTMIGRATE
        # The connection opened before the migration still echoes, now from host b.
        for _ in range(3):
            session.echo()
        lost = pinger.lost()
        print(f"\nmigration {guest.name} workload={guest.workload_mibps}: took {took:.2f}s, "
              f"QEMU total {progress.total_time_ms} ms, downtime {progress.downtime_ms} ms, "
              f"{progress.transferred_bytes >> 20} MiB, {lost} pings lost at 10 ms, "
              f"statuses {sorted(set(seen))}")
        assert lost < 100, f"{lost} pings lost"
        lab.a.stop(guest.name)
        assert lab.a.state(guest.name) is GuestState.ABSENT
        ping(lab.client, ip)
        assert http_get(lab.client, ip, 80).strip() == f"vmferry guest {guest.name} port 80"
        session.echo()
    finally:
        if pinger is not None:
            pinger.kill()
        session.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("guest", [20], indirect=True, ids=["workload20"])
def test_cancelled_migration_leaves_source_running(lab: Lab, guest: GuestSpec) -> None:
    ip = ip_of(guest)
    uri = f"tcp:{MIG_B}:49153"
    # 40 Mbit/s: a 256 MiB guest needs far longer than the test waits.
    tuning = MigrationTuning(bandwidth_mbps=40)
    session = EchoSession(lab.client, ip)
    try:
        lab.b.start(guest, incoming_uri=uri, tuning=tuning)
        lab.a.migrate(guest.name, uri, tuning)
        progress = lab.a.migration_progress(guest.name)
        deadline = time.monotonic() + 10
        while progress.transferred_bytes == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
            progress = lab.a.migration_progress(guest.name)
        assert progress.status == "active", progress
        session.echo()                        # the source serves while it migrates
        lab.a.cancel_migration(guest.name)
        assert lab.a.migration_progress(guest.name).status == "cancelled"
        assert lab.a.state(guest.name) is GuestState.RUNNING
        session.echo()
        ping(lab.client, ip)
        # The destination's QEMU ends itself when its incoming stream breaks.
        lab.b.stop(guest.name)

        # A wait that gives up cancels the migration too, and says what it waited for.
        lab.b.start(guest, incoming_uri=uri, tuning=tuning)
        lab.a.migrate(guest.name, uri, tuning)
        with pytest.raises(WaitTimeout, match=f"migration of guest {guest.name}"):
            lab.a.wait_migration(guest.name, timeout=1.5)
        assert lab.a.migration_progress(guest.name).status == "cancelled"
        assert lab.a.state(guest.name) is GuestState.RUNNING
        session.echo()
    finally:
        session.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("guest", [20], indirect=True, ids=["workload20"])
def test_postcopy_migration(lab: Lab, guest: GuestSpec) -> None:
    ip = ip_of(guest)
    uri = f"tcp:{MIG_B}:49154"
    tuning = MigrationTuning(bandwidth_mbps=200, postcopy=True)
    session = EchoSession(lab.client, ip)
    try:
        lab.b.start(guest, incoming_uri=uri, tuning=tuning)
        lab.a.migrate(guest.name, uri, tuning)
        seen: list[str] = []
        progress = lab.a.wait_migration(guest.name, timeout=90, postcopy_after_s=0.5,
                                        on_progress=lambda p: seen.append(p.status))
        assert progress.status == "completed", progress
        assert "postcopy-active" in seen
        assert int(str(progress.extra.get("postcopy-bytes", 0))) > 0
        lab.b.wait_running(guest.name, timeout=30)
        session.echo()
        lab.a.stop(guest.name)
        ping(lab.client, ip)
    finally:
        session.close()


def wait_for_event(hv: QemuHypervisor, name: str, kind: str, status: str | None = None, *,
                   after: int = 0, timeout: float = 60.0) -> GuestEvent:
    """The first recorded event of ``kind`` (and ``status``) after seq ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in hv.events(name, after=after, timeout=deadline - time.monotonic()):
            if event.kind == kind and (status is None or event.status == status):
                return event
            after = event.seq
    raise AssertionError(f"no {kind} {status or ''} event of {name} within {timeout}s")


@pytest.mark.timeout(180)
def test_pause_before_switchover_and_events(lab: Lab, guest: GuestSpec) -> None:
    uri = f"tcp:{MIG_B}:49155"
    tuning = MigrationTuning(pause_before_switchover=True)
    before = lab.a.events(guest.name)
    mark = before[-1].seq if before else 0
    lab.b.start(guest, incoming_uri=uri, tuning=tuning)
    lab.a.migrate(guest.name, uri, tuning)
    paused = wait_for_event(lab.a, guest.name, "MIGRATION", "pre-switchover", after=mark)
    # Held there: the guest is stopped on the source, the destination still waits.
    assert lab.a.migration_progress(guest.name).status == "pre-switchover"
    assert lab.a.state(guest.name) is GuestState.PAUSED
    assert lab.b.state(guest.name) is GuestState.INMIGRATE
    stop = wait_for_event(lab.a, guest.name, "STOP", after=mark)
    assert stop.seq < paused.seq
    lab.a.continue_migration(guest.name)
    progress = lab.a.wait_migration(guest.name, timeout=90)
    assert progress.status == "completed", progress
    lab.b.wait_running(guest.name, timeout=30)
    resume = wait_for_event(lab.b, guest.name, "RESUME")
    source = lab.a.events(guest.name, after=mark)
    statuses = [e.status for e in source if e.kind == "MIGRATION"]
    assert statuses[:2] == ["setup", "active"], statuses
    assert statuses[-3:] == ["pre-switchover", "device", "completed"], statuses
    assert [e.seq for e in source] == sorted({e.seq for e in source})
    # QMP's own clocks, one host here: the guest stopped before it resumed elsewhere.
    assert stop.timestamp < resume.timestamp
    assert abs(resume.timestamp - time.time()) < 600
    # A restarted agent (a new connection) records where the migration stands, then
    # keeps listening.
    lab.a.disconnect(guest.name)
    resync = lab.a.events(guest.name, after=source[-1].seq)
    assert [(e.kind, e.status) for e in resync] == [("VMFERRY_RESYNC", "completed")]
    with pytest.raises(HypervisorError):
        lab.a.continue_migration(guest.name)   # not in pre-switchover any more
    lab.a.stop(guest.name)
    ping(lab.client, ip_of(guest))


@pytest.mark.timeout(120)
def test_exec_uri_is_refused_and_could_not_run_anything(lab: Lab, guest: GuestSpec,
                                                        tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    for uri in (f"exec:touch {marker}", f"file:{marker}", "unix:/tmp/x.sock", "fd:3",
                f"tcp:{MIG_B}:0", f"tcp:{MIG_B}:49152,ipv4=on"):
        with pytest.raises(InputError) as info:
            lab.a.migrate(guest.name, uri, MigrationTuning())
        assert info.value.field == "uri"
        with pytest.raises(InputError):
            lab.b.start(guest, incoming_uri=uri)
    assert lab.b.state(guest.name) is GuestState.ABSENT
    assert lab.a.state(guest.name) is GuestState.RUNNING
    # Past the driver's check (as if QMP were reached another way), seccomp's spawn=deny
    # stops QEMU from running the command; the guest runs on.
    with pytest.raises(HypervisorError) as refused:
        lab.a.qmp.execute(guest.name, "migrate", {"uri": f"exec:touch {marker}"})
    assert "Failed to fork (Operation not permitted)" in str(refused.value.fields["cause"])
    assert lab.a.migration_progress(guest.name).status == "failed"
    assert lab.a.state(guest.name) is GuestState.RUNNING
    ping(lab.client, ip_of(guest))
    assert not marker.exists()


# ---- migration over TLS -------------------------------------------------------------------------

def forge_stream(namespace: str, ip: str, port: int) -> None:
    """A plain TCP client that writes what a QEMU migration stream starts with, then junk."""
    sock = socket_in(namespace)
    try:
        sock.settimeout(5)
        sock.connect((ip, port))
        sock.sendall(b"QEVM\x00\x00\x00\x03" + bytes(range(256)) * 16)
        with contextlib.suppress(OSError):
            sock.recv(64)           # TLS expects a ClientHello: QEMU drops us
    finally:
        sock.close()


def wait_log(hv: QemuHypervisor, name: str, text: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = hv.files(name)["log"].read_text(errors="replace")
        if text.lower() in log.lower() or time.monotonic() >= deadline:
            return log
        time.sleep(0.05)


@pytest.mark.timeout(240)
def test_migration_over_tls_refuses_forged_and_unauthorized_streams(
        lab: Lab, guest: GuestSpec, tmp_path: Path) -> None:
    root = tmp_path / "pki"
    pki.init_ca(root)
    dir_a = pki.issue(root, "host-a", ips=[MIG_A])
    dir_b = pki.issue(root, "host-b", ips=[MIG_B])
    dir_rogue = pki.issue(root, "rogue", ips=[MIG_A])     # same CA, a name b does not accept
    # TLS is driver configuration: drivers over the same run dirs, with credentials.
    tls_a = QemuHypervisor(lab.a.run_dir, lab.image, namespace=lab.ns_a, tls_dir=dir_a)
    tls_b = QemuHypervisor(lab.b.run_dir, lab.image, namespace=lab.ns_b, tls_dir=dir_b)
    rogue_a = QemuHypervisor(lab.a.run_dir, lab.image, namespace=lab.ns_a, tls_dir=dir_rogue)
    port = 49160
    uri = f"tcp:{MIG_B}:{port}"
    tls_b.start(guest, incoming_uri=uri, tuning=MigrationTuning(tls_peer_name="host-a"))
    session = EchoSession(lab.client, ip_of(guest))
    try:
        # 1. Anyone on the migration network, without a certificate.
        forge_stream(lab.ns_a, MIG_B, port)
        log = wait_log(tls_b, guest.name, "TLS handshake failed")
        assert "TLS handshake failed" in log, log
        assert tls_b.state(guest.name) is GuestState.INMIGRATE, log
        # 2. A certificate of the same CA under a name the destination was not told.
        rogue_a.migrate(guest.name, uri, MigrationTuning(tls_peer_name="host-b"))
        refused = rogue_a.wait_migration(guest.name, timeout=60)
        assert refused.status == "failed", refused
        log = wait_log(tls_b, guest.name, "authz check for CN=rogue is denied")
        assert "authz check for CN=rogue is denied" in log, log
        assert tls_b.state(guest.name) is GuestState.INMIGRATE
        assert lab.a.state(guest.name) is GuestState.RUNNING
        session.echo()
        # 3. The real source: verified both ways, authorized by name.
        tls_a.migrate(guest.name, uri, MigrationTuning(tls_peer_name="host-b"))
        progress = tls_a.wait_migration(guest.name, timeout=120)
        assert progress.status == "completed", progress
        tls_b.wait_running(guest.name, timeout=30)
        tls_b.announce(guest.name)
        session.echo()
        print(f"\nTLS migration: QEMU total {progress.total_time_ms} ms, downtime "
              f"{progress.downtime_ms} ms, {progress.transferred_bytes >> 20} MiB")
    finally:
        session.close()
