"""The libvirt driver alone on real libvirt daemons, QEMU (TCG), taps and namespaces.

Lab of this module (namespaces ``vflv-<run>-*``; nothing else is touched)::

    a: libvirtd (private /etc,/run,/var/lib libvirt) ── tap ── guest (source)
    b: libvirtd (its own, another host UUID)         ── tap ── guest (destination)
    a mig0 198.51.100.5/30 ─── veth ─── b mig0 198.51.100.6/30   (the migration network:
       the daemons' peer-to-peer connection and QEMU's stream)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmferry import privileged
from vmferry.drivers.hypervisor.base import (
    GuestSpec,
    GuestState,
    MigrationProgress,
    MigrationTuning,
)
from vmferry.drivers.hypervisor.libvirt import LibvirtHypervisor
from vmferry.errors import HypervisorError
from vmferry.image.builder import ensure_image
from vmferry.lab.libvirt import LibvirtDaemon

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: libvirtd and QEMU in namespaces"),
    pytest.mark.skipif(shutil.which("libvirtd") is None,
                       reason="libvirtd missing: run scripts/install-system-deps.sh"),
]

IMAGE_DIR = "/var/lib/vmferry/images"
PREFIX = f"vflv-{os.getpid() % 100000}"
MIG_A, MIG_B = "198.51.100.5", "198.51.100.6"
TAP = "vm-lv0"


@dataclass
class Host:
    name: str
    namespace: str
    daemon: LibvirtDaemon
    driver: LibvirtHypervisor


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Host]]:
    os.environ.setdefault("VMFERRY_IMAGE_DIR", IMAGE_DIR)
    image = ensure_image()
    root = tmp_path_factory.mktemp("lv")
    made: dict[str, Host] = {}
    try:
        for name in ("a", "b"):
            namespace = f"{PREFIX}-{name}"
            privileged.create_namespace(namespace)
        privileged.create_veth(f"{PREFIX}-a", "mig0", f"{PREFIX}-b", "mig0")
        for name, address in (("a", MIG_A), ("b", MIG_B)):
            namespace = f"{PREFIX}-{name}"
            privileged.add_address(namespace, "mig0", f"{address}/30")
            privileged.create_tap(namespace, TAP)
            daemon = LibvirtDaemon(name, namespace, root / name / "libvirt",
                                   console_dir=root / name / "guests", listen_address=address)
            daemon.start()
            driver = LibvirtHypervisor(root / name / "run", image, uri=daemon.uri,
                                       console_dir=root / name / "guests", namespace=namespace,
                                       progress_interval=0.2)
            made[name] = Host(name, namespace, daemon, driver)
        yield made
    finally:
        for host in made.values():
            host.daemon.stop()
        for name in ("a", "b"):
            privileged.delete_namespace(f"{PREFIX}-{name}")


def spec(name: str) -> GuestSpec:
    return GuestSpec(name=name, memory_mib=256, mac="52:54:00:12:34:56", tap=TAP,
                     ip_cidr="192.0.2.10/24", workload_mibps=2)


def qemu_cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_start_migrate_and_events(hosts: dict[str, Host]) -> None:
    a, b = hosts["a"].driver, hosts["b"].driver
    assert a.version().startswith("10.")
    assert "q35" in a.machine_types()
    vm = spec("lv1")
    try:
        pid = a.start(vm)
        assert a.start(vm) == pid                       # idempotent
        a.wait_ready(vm.name, timeout=90)
        assert a.state(vm.name) is GuestState.RUNNING
        argv = qemu_cmdline(pid)
        # libvirt's own seccomp default: the same sandbox as the QMP driver's -sandbox.
        assert "-sandbox" in argv and "spawn=deny" in argv[argv.index("-sandbox") + 1]
        assert any(f"vmferry.name={vm.name}" in arg for arg in argv)
        # libvirt opens vmferry's tap itself and hands QEMU the descriptor.
        assert '"type":"tap"' in " ".join(argv)
        assert f"dev='{TAP}'" in a._require(vm.name).XMLDesc(0).replace('"', "'")
        with pytest.raises(HypervisorError, match="before switchover"):
            a.migrate(vm.name, f"tcp:{MIG_B}:49152",
                      MigrationTuning(pause_before_switchover=True))
        assert a.state(vm.name) is GuestState.RUNNING

        b.start(vm, incoming_uri=f"tcp:{MIG_B}:49152", tuning=MigrationTuning())
        assert b.state(vm.name) is GuestState.INMIGRATE
        cursor_a = a.events(vm.name)[-1].seq if a.events(vm.name) else 0
        a.migrate(vm.name, f"tcp:{MIG_B}:49152", MigrationTuning(max_downtime_ms=300))
        seen: list[str] = []
        states: list[tuple[GuestState, str]] = []

        def watch(progress: MigrationProgress) -> None:
            seen.append(progress.status)
            states.append((a.state(vm.name), progress.status))

        a.progress_interval = 0.01
        final = a.wait_migration(vm.name, timeout=180, on_progress=watch)
        # The source never looks gone while its migration ends (the engine reads it then).
        assert all(s is not GuestState.ABSENT for s, _ in states), states
        assert final.status == "completed", final.error
        assert final.downtime_ms is not None and final.total_bytes > 0
        assert "active" in seen or "setup" in seen
        assert a.state(vm.name) is GuestState.POSTMIGRATE
        assert b.state(vm.name) is GuestState.RUNNING
        assert a.migration_progress(vm.name).status == "completed"
        kinds_a = [(e.kind, e.status) for e in a.events(vm.name, after=cursor_a, timeout=5)]
        assert ("STOP", None) in kinds_a
        assert ("MIGRATION", "completed") in kinds_a
        assert [e.seq for e in a.events(vm.name)] == sorted({e.seq for e in a.events(vm.name)})
        assert ("RESUME", None) in [(e.kind, e.status) for e in b.events(vm.name, timeout=5)]
        new_pid = b.pid(vm.name)
        assert new_pid is not None and new_pid != pid
        with pytest.raises(HypervisorError, match="pre-switchover"):
            b.continue_migration(vm.name)
        b.announce(vm.name)

        # Back, throttled, cancelled: the guest keeps running where it was.
        a.start(vm, incoming_uri=f"tcp:{MIG_A}:49153", tuning=MigrationTuning())
        b.migrate(vm.name, f"tcp:{MIG_A}:49153", MigrationTuning(bandwidth_mbps=8))
        assert b.migration_progress(vm.name).status in ("setup", "active")
        b.cancel_migration(vm.name)
        assert b.migration_progress(vm.name).status == "cancelled"
        assert b.state(vm.name) is GuestState.RUNNING
        assert ("MIGRATION", "cancelled") in [(e.kind, e.status) for e in b.events(vm.name)]

        # And back for real: a guest that arrived by migration leaves by migration too.
        b.migrate(vm.name, f"tcp:{MIG_A}:49153", MigrationTuning())
        assert b.wait_migration(vm.name, timeout=180).status == "completed"
        assert b.state(vm.name) is GuestState.POSTMIGRATE
        assert a.state(vm.name) is GuestState.RUNNING
    finally:
        a.stop(vm.name)
        b.stop(vm.name)
    assert a.state(vm.name) is GuestState.ABSENT and b.state(vm.name) is GuestState.ABSENT
    assert a.guests() == [] and b.guests() == []
    assert not list((hosts["a"].driver.console_dir).glob("lv1.*"))
