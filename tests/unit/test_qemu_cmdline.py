"""The QEMU driver without QEMU: command line, kernel parameters, QMP replies, discovery."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qemu.qmp import EventListener, Message

from vmferry.drivers.hypervisor.base import (
    GuestEvent,
    GuestNic,
    GuestSpec,
    GuestState,
    MigrationTuning,
)
from vmferry.drivers.hypervisor.history import EventHistory
from vmferry.drivers.hypervisor.qemu import (
    QemuHypervisor,
    guest_files,
    kernel_append,
    parse_kernel_append,
    progress_from_query,
    qemu_argv,
    state_from_status,
    validate_spec,
)
from vmferry.drivers.hypervisor.qemu_cmdline import version_from_text
from vmferry.drivers.hypervisor.qemu_migration import TLS_FILES
from vmferry.drivers.hypervisor.qmp_session import _Recorder
from vmferry.errors import HypervisorError, InputError, PrivilegedError
from vmferry.image.builder import GuestImage

IMAGE = GuestImage(kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd.img"),
                   kernel_package="linux-image-x", kernel_version="1", kernel_release="x",
                   busybox_version="1", init_sha256="0", modules=("virtio",),
                   built_at="2026-01-01T00:00:00+00:00")
SPEC = GuestSpec(name="web1", memory_mib=256, mac="52:54:00:AB:CD:01", tap="vft-web1",
                 ip_cidr="192.0.2.10/24", gateway="192.0.2.1", workload_mibps=5)
HOTPLUG = dataclasses.replace(SPEC, hotplug_ports=True)


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_argv_runs_a_sandboxed_tcg_guest_on_the_tap() -> None:
    files = guest_files(Path("/run/vf"), "web1")
    argv = qemu_argv(SPEC, IMAGE, files)
    assert argv[0] == "qemu-system-x86_64"
    assert option(argv, "-accel") == "tcg"
    assert option(argv, "-cpu") == "qemu64"
    assert option(argv, "-machine") == "q35"
    assert option(argv, "-m") == "256"
    assert option(argv, "-smp") == "1"
    assert {"-nographic", "-nodefaults", "-no-reboot"} <= set(argv)
    # -daemonize forks and calls setsid, which the sandbox denies: the driver detaches QEMU.
    assert "-daemonize" not in argv
    assert option(argv, "-sandbox") == (
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
    assert option(argv, "-serial") == "file:/run/vf/web1.serial.log"
    assert option(argv, "-pidfile") == "/run/vf/web1.pid"
    assert option(argv, "-qmp") == "unix:/run/vf/web1.qmp,server=on,wait=off"
    assert option(argv, "-kernel") == "/img/vmlinuz"
    assert option(argv, "-initrd") == "/img/initrd.img"
    assert option(argv, "-netdev") == (
        "tap,id=n0,ifname=vft-web1,script=no,downscript=no,vnet_hdr=off")
    # No hot-plug root ports unless the site asks for them (Topology.guest_hotplug).
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-device"] == [
        "virtio-net-pci,id=nic0,netdev=n0,mac=52:54:00:ab:cd:01,romfile="]
    assert "-incoming" not in argv
    # With them: both root ports, the NIC on the first (a move by "dual" NIC uses the other).
    argv = qemu_argv(HOTPLUG, IMAGE, guest_files(Path("/run/vf"), "web1"))
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-device"] == [
        "pcie-root-port,id=vmfp0,chassis=1,bus=pcie.0",
        "pcie-root-port,id=vmfp1,chassis=2,bus=pcie.0",
        "virtio-net-pci,id=nic0,netdev=n0,mac=52:54:00:ab:cd:01,romfile=,bus=vmfp0"]


def test_a_second_nic_sits_on_the_other_root_port_with_the_same_ids_on_both_ends() -> None:
    files = guest_files(Path("/run/vf"), "web1")
    source = dataclasses.replace(HOTPLUG,
                                 aux_nic=GuestNic("52:54:00:ab:cd:02", "vm-web1.n", 1))
    # The destination's main NIC is the new one (its tap is the VM's), the old one is aux.
    dest = dataclasses.replace(HOTPLUG, mac="52:54:00:ab:cd:02", nic_slot=1,
                               aux_nic=GuestNic("52:54:00:ab:cd:01", "vm-web1.n", 0))

    def nics(argv: list[str]) -> set[str]:
        return {a for a in argv if a.startswith("virtio-net-pci")}

    assert nics(qemu_argv(source, IMAGE, files)) == nics(qemu_argv(dest, IMAGE, files)) == {
        "virtio-net-pci,id=nic0,netdev=n0,mac=52:54:00:ab:cd:01,romfile=,bus=vmfp0",
        "virtio-net-pci,id=nic1,netdev=n1,mac=52:54:00:ab:cd:02,romfile=,bus=vmfp1"}
    with pytest.raises(InputError, match="aux_nic"):
        validate_spec(dataclasses.replace(source, nic_slot=1))


def test_a_machine_without_root_ports_keeps_one_nic_on_the_root_bus() -> None:
    argv = qemu_argv(dataclasses.replace(HOTPLUG, machine="pc"), IMAGE,
                     guest_files(Path("/run/vf"), "web1"))
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-device"] == [
        "virtio-net-pci,id=nic0,netdev=n0,mac=52:54:00:ab:cd:01,romfile="]


def test_destination_argv_differs_only_by_deferred_incoming() -> None:
    files = guest_files(Path("/run/vf"), "web1")
    source = qemu_argv(SPEC, IMAGE, files, qemu_binary="/opt/qemu")
    dest = qemu_argv(SPEC, IMAGE, files, qemu_binary="/opt/qemu", incoming=True)
    assert dest[:len(source)] == source
    assert dest[len(source):] == ["-incoming", "defer"]


def test_kernel_append_carries_the_guest_identity() -> None:
    append = kernel_append(SPEC)
    assert append.startswith("console=ttyS0 quiet")
    assert parse_kernel_append(append) == {"name": "web1", "ip": "192.0.2.10/24",
                                           "gw": "192.0.2.1", "workload": "5"}
    no_gw = GuestSpec(name="a", memory_mib=128, mac="52:54:00:00:00:01", tap="t",
                      ip_cidr="192.0.2.2/24")
    assert parse_kernel_append(kernel_append(no_gw)) == {"name": "a", "ip": "192.0.2.2/24",
                                                         "workload": "0"}


def test_parse_kernel_append_ignores_other_words() -> None:
    assert parse_kernel_append("quiet vmferry.name=x root=/dev/sda vmferry.flag") == {"name": "x"}


@pytest.mark.parametrize(("field", "value"), [
    ("name", "has space"), ("name", "a.b"), ("name", ""), ("name", "x" * 64),
    ("mac", "52:54:00:00:00"), ("mac", "01:00:5e:00:00:01"),
    ("ip_cidr", "192.0.2.10"), ("ip_cidr", "192.0.2.10/24 init=/bin/sh"),
    ("ip_cidr", "2001:db8::1/64"), ("gateway", "gw"), ("memory_mib", 16), ("vcpus", 0),
    ("workload_mibps", -1), ("machine", "q35 -evil"),
])
def test_validate_spec_rejects(field: str, value: object) -> None:
    bad = GuestSpec(**{**SPEC.__dict__, field: value})
    with pytest.raises(InputError) as info:
        validate_spec(bad)
    assert info.value.field == field


def test_validate_spec_rejects_bad_tap_name() -> None:
    with pytest.raises(PrivilegedError):
        validate_spec(GuestSpec(**{**SPEC.__dict__, "tap": "a-very-long-tap-name"}))


def test_validate_spec_accepts_the_example() -> None:
    validate_spec(SPEC)


@pytest.mark.parametrize(("status", "state"), [
    ("running", GuestState.RUNNING), ("inmigrate", GuestState.INMIGRATE),
    ("postmigrate", GuestState.POSTMIGRATE), ("paused", GuestState.PAUSED),
    ("finish-migrate", GuestState.PAUSED), ("prelaunch", GuestState.PAUSED),
    ("shutdown", GuestState.SHUTDOWN), ("guest-panicked", GuestState.SHUTDOWN),
])
def test_state_from_status(status: str, state: GuestState) -> None:
    assert state_from_status(status) == state


COMPLETED = {
    "status": "completed", "setup-time": 1, "downtime": 14, "total-time": 364,
    "ram": {"transferred": 95979132, "remaining": 0, "total": 268967936, "duplicate": 42525,
            "normal": 23263, "normal-bytes": 95285248, "dirty-sync-count": 3, "page-size": 4096,
            "mbps": 2115.24, "dirty-pages-rate": 0, "pages-per-second": 357534,
            "precopy-bytes": 91904464, "downtime-bytes": 3949752, "postcopy-bytes": 0},
}
ACTIVE = {
    "status": "active", "setup-time": 1, "total-time": 1501, "expected-downtime": 50,
    "cpu-throttle-percentage": 20,
    "ram": {"transferred": 57156729, "remaining": 198959104, "total": 268967936,
            "dirty-pages-rate": 4192, "mbps": 304.68, "dirty-sync-count": 1},
}


def test_progress_of_a_completed_migration() -> None:
    progress = progress_from_query(COMPLETED)
    assert progress.status == "completed"
    assert progress.downtime_ms == 14
    assert progress.total_time_ms == 364
    assert progress.setup_time_ms == 1
    assert progress.transferred_bytes == 95979132
    assert progress.total_bytes == 268967936
    assert progress.mbps == pytest.approx(2115.24)
    assert progress.dirty_sync_count == 3
    assert progress.extra["normal-bytes"] == 95285248
    assert progress.error is None


def test_progress_of_an_active_migration() -> None:
    progress = progress_from_query(ACTIVE)
    assert progress.status == "active"
    assert progress.downtime_ms is None
    assert progress.expected_downtime_ms == 50
    assert progress.dirty_pages_rate == 4192
    assert progress.cpu_throttle_percent == 20
    assert progress.remaining_bytes == 198959104


def test_progress_before_any_migration_and_after_failure() -> None:
    assert progress_from_query({}).status == "none"
    failed = progress_from_query({"status": "failed", "error-desc": "Connection refused"})
    assert failed.status == "failed"
    assert failed.error == "Connection refused"


def testversion_from_text() -> None:
    text = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"
    assert version_from_text(text) == "10.0.2"
    with pytest.raises(HypervisorError):
        version_from_text("no version here")


# ---- discovery from pidfiles -----------------------------------------------------------------

def fake_qemu(run_dir: Path, name: str) -> subprocess.Popen[bytes]:
    """A process whose command line names the guest's QMP socket, as QEMU's would."""
    qmp_arg = f"unix:{guest_files(run_dir, name)['qmp']},server=on,wait=off"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", qmp_arg])
    guest_files(run_dir, name)["pid"].write_text(f"{proc.pid}\n")
    return proc


def test_guests_are_found_from_pidfiles(tmp_path: Path) -> None:
    hv = QemuHypervisor(tmp_path, IMAGE)
    alive = fake_qemu(tmp_path, "alive")
    try:
        # A pidfile of a dead process and one whose pid belongs to an unrelated process.
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait(timeout=10)
        (tmp_path / "dead.pid").write_text(str(dead.pid))
        (tmp_path / "reused.pid").write_text(str(os.getpid()))
        (tmp_path / "not a guest.pid").write_text(str(alive.pid))
        assert hv.guests() == ["alive"]
        assert hv.pid("alive") == alive.pid
        assert hv.pid("reused") is None
        assert hv.state("dead") == GuestState.ABSENT
    finally:
        alive.kill()
        alive.wait(timeout=10)
    assert hv.guests() == []


def test_guests_of_a_missing_run_dir(tmp_path: Path) -> None:
    assert QemuHypervisor(tmp_path / "nothing", IMAGE).guests() == []


def test_stop_removes_every_file_of_the_guest_only(tmp_path: Path) -> None:
    hv = QemuHypervisor(tmp_path, IMAGE)
    proc = fake_qemu(tmp_path, "g1")
    try:
        for path in guest_files(tmp_path, "g1").values():
            path.touch()
        (tmp_path / "g10.pid").write_text("1")
        hv.stop("g1")
        assert proc.wait(timeout=10) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g10.pid"]


def test_start_refuses_a_missing_tap_before_running_qemu(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vmferry.privileged.link_exists", lambda ns, ifname: False)
    with pytest.raises(HypervisorError, match="tap vft-web1 does not exist"):
        QemuHypervisor(tmp_path, IMAGE).start(SPEC)
    assert list(tmp_path.iterdir()) == []


def test_spec_of_a_guest_round_trips(tmp_path: Path) -> None:
    hv = QemuHypervisor(tmp_path, IMAGE)
    guest_files(tmp_path, "web1")["spec"].write_text(json.dumps(dataclasses.asdict(SPEC)))
    assert hv.spec("web1") == SPEC
    with pytest.raises(HypervisorError):
        hv.spec("other")


# ---- security: URIs, sandbox, secrets ----------------------------------------------------------

def test_migrate_refuses_non_tcp_uris_before_any_qmp(tmp_path: Path) -> None:
    hv = QemuHypervisor(tmp_path, IMAGE)
    for uri in ("exec:touch /tmp/x", "file:/tmp/x", "unix:/tmp/x", "fd:3", "tcp:[::1:1"):
        with pytest.raises(InputError) as info:
            hv.migrate("web1", uri, MigrationTuning())
        assert info.value.field == "uri"
        with pytest.raises(InputError) as info:
            hv.start(SPEC, incoming_uri=uri)
        assert info.value.field == "uri"
    assert list(tmp_path.iterdir()) == []


def test_started_qemu_is_sandboxed_and_gets_no_secret_in_argv(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tls = tmp_path / "tls"
    tls.mkdir()
    for name in TLS_FILES:
        (tls / name).write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n")
    hv = QemuHypervisor(tmp_path / "run", IMAGE, tls_dir=tls)
    launched: list[list[str]] = []

    def spawn(namespace: str | None, argv: list[str], *, log_path: Path,
              env: object = None) -> subprocess.Popen[bytes]:
        launched.append(list(argv))
        log_path.write_text("qemu: refused by the test\n")
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])

    monkeypatch.setattr("vmferry.privileged.link_exists", lambda ns, ifname: True)
    monkeypatch.setattr("vmferry.privileged.spawn_in_namespace", spawn)
    with pytest.raises(HypervisorError, match="QEMU failed to start guest web1") as info:
        hv.start(SPEC, incoming_uri="tcp:198.51.100.2:49152")
    assert "refused by the test" in str(info.value.fields["cause"])
    [argv] = launched
    assert option(argv, "-sandbox") == (
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
    # TLS credentials reach QEMU over QMP (object-add), never through its command line.
    joined = " ".join(argv)
    assert str(tls) not in joined and "key" not in joined and "c2VjcmV0" not in joined
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


def test_tls_dir_must_hold_every_credential(tmp_path: Path) -> None:
    (tmp_path / "ca-cert.pem").write_text("x")
    with pytest.raises(InputError) as info:
        QemuHypervisor(tmp_path, IMAGE, tls_dir=tmp_path)
    assert info.value.field == "tls_dir" and "server-key.pem" in info.value.reason


def test_recorder_keeps_qmp_timestamps_and_migration_status() -> None:
    history = EventHistory()
    default = EventListener()
    recorder = _Recorder(history, default)
    event = Message({"event": "MIGRATION", "data": {"status": "pre-switchover"},
                     "timestamp": {"seconds": 1700000000, "microseconds": 250}})
    asyncio.run(default.put(event))
    asyncio.run(recorder.put(event))
    asyncio.run(recorder.put(Message({"event": "STOP", "timestamp": {"seconds": 1700000001,
                                                                      "microseconds": 0}})))
    assert history.after(0) == [
        GuestEvent(seq=1, kind="MIGRATION", status="pre-switchover", timestamp=1700000000.00025),
        GuestEvent(seq=2, kind="STOP", status=None, timestamp=1700000001.0)]
    assert default.empty()      # nobody reads the catch-all listener: it is kept empty
