"""What the libvirt driver reports while libvirt walks a migration through its phases
(Begin, Prepare, Perform, Finish, Confirm): the readings libvirt gives on the way are replayed
by an in-memory domain, and the engine must see the side that runs the guest as the truth."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import libvirt

from vmferry.drivers.hypervisor.base import GuestState, MigrationTuning
from vmferry.drivers.hypervisor.libvirt import LibvirtHypervisor
from vmferry.image.builder import GuestImage

RUNNING, PAUSED, SHUTOFF = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED,
                            libvirt.VIR_DOMAIN_SHUTOFF)


class _NoDomain(libvirt.libvirtError):
    def __init__(self) -> None:
        Exception.__init__(self, "no domain")

    def get_error_code(self) -> int:
        return int(libvirt.VIR_ERR_NO_DOMAIN)


class FakeDomain:
    """A domain whose (state, reason, active) the test sets; migrateToURI3 blocks until
    the test releases it (libvirt's Confirm ends the call)."""

    def __init__(self, name: str, state: tuple[int, int, bool]) -> None:
        self._name = name
        self.reading = state
        self.migrating = False
        self.release = threading.Event()
        self.fail: str | None = None

    def name(self) -> str:
        return self._name

    def state(self) -> list[int]:
        return [self.reading[0], self.reading[1]]

    def isActive(self) -> bool:
        return self.reading[2]

    def jobInfo(self) -> list[int]:
        return [libvirt.VIR_DOMAIN_JOB_UNBOUNDED if self.migrating
                else libvirt.VIR_DOMAIN_JOB_NONE] + [0] * 11

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        return {"type": 3, "downtime": 12, "time_elapsed": 400, "data_total": 1000,
                "data_processed": 1000, "data_remaining": 0}

    def migrateSetMaxDowntime(self, ms: int, flags: int) -> None:
        pass

    def migrateToURI3(self, uri: str, params: dict[str, Any], flags: int) -> None:
        self.migrating = True
        self.release.wait(10)
        self.migrating = False
        if self.fail:
            raise libvirt.libvirtError(self.fail)


class FakeConnection:
    def __init__(self) -> None:
        self.domains: dict[str, FakeDomain] = {}

    def isAlive(self) -> bool:
        return True

    def lookupByName(self, name: str) -> FakeDomain:
        if name not in self.domains:
            raise _NoDomain()
        return self.domains[name]


def driver(tmp_path: Path) -> tuple[LibvirtHypervisor, FakeConnection]:
    image = GuestImage(kernel=tmp_path / "k", initrd=tmp_path / "i", kernel_package="k",
                       kernel_version="1", kernel_release="r", busybox_version="b",
                       init_sha256="0", modules=(), built_at="now")
    drv = LibvirtHypervisor(tmp_path, image, uri="test:///none")
    conn = FakeConnection()
    drv._connection = conn
    return drv, conn


def test_source_is_never_lost_between_completion_and_confirm(tmp_path: Path) -> None:
    drv, conn = driver(tmp_path)
    dom = conn.domains["vm"] = FakeDomain("vm", (RUNNING, 1, True))
    drv.migrate("vm", "tcp:203.0.113.3:49152", MigrationTuning())
    assert drv.state("vm") is GuestState.RUNNING
    assert drv.migration_progress("vm").status == "active"
    # Perform's last round, and QEMU completed until Confirm: paused for the migration.
    # The source is not "inmigrate" (that reason is the destination's).
    dom.reading = (PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION, True)
    assert drv.state("vm") is GuestState.PAUSED
    # Confirm stops QEMU: the domain reads shut off before migrateToURI3 returns.
    dom.reading = (SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN, False)
    threading.Timer(0.2, dom.release.set).start()
    assert drv.state("vm") is GuestState.POSTMIGRATE      # waited for libvirt's outcome
    dom.reading = (SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED, False)
    assert drv.state("vm") is GuestState.POSTMIGRATE
    progress = drv.migration_progress("vm")
    assert progress.status == "completed" and progress.downtime_ms == 12


def test_source_that_failed_keeps_running(tmp_path: Path) -> None:
    drv, conn = driver(tmp_path)
    dom = conn.domains["vm"] = FakeDomain("vm", (RUNNING, 1, True))
    drv.migrate("vm", "tcp:203.0.113.3:49152", MigrationTuning())
    dom.fail = "Finish failed on the destination"
    dom.release.set()
    assert drv.wait_migration("vm", timeout=5).status == "failed"
    assert drv.state("vm") is GuestState.RUNNING           # Confirm resumed it
    # Killed afterwards: gone, not "postmigrate".
    dom.reading = (SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED, False)
    assert drv.state("vm") is GuestState.ABSENT


def test_destination_is_inmigrate_until_it_runs(tmp_path: Path) -> None:
    drv, conn = driver(tmp_path)
    drv.files("vm")["incoming"].write_text("tcp:203.0.113.3:49152\n")
    assert drv.state("vm") is GuestState.INMIGRATE        # before Prepare
    dom = conn.domains["vm"] = FakeDomain("vm", (SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN,
                                                 False))
    assert drv.state("vm") is GuestState.INMIGRATE        # Prepare's new domain object
    dom.reading = (PAUSED, libvirt.VIR_DOMAIN_PAUSED_STARTING_UP, True)
    assert drv.state("vm") is GuestState.INMIGRATE
    dom.reading = (PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION, True)
    assert drv.state("vm") is GuestState.INMIGRATE        # receiving, Finish
    dom.reading = (RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED, True)
    assert drv.state("vm") is GuestState.RUNNING          # arrived
    # From now on an ordinary guest: one that dies is gone.
    dom.reading = (SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, False)
    assert drv.state("vm") is GuestState.ABSENT


def test_plain_guest_readings(tmp_path: Path) -> None:
    drv, conn = driver(tmp_path)
    assert drv.state("vm") is GuestState.ABSENT
    dom = conn.domains["vm"] = FakeDomain("vm", (PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER, True))
    assert drv.state("vm") is GuestState.PAUSED
    # A source whose migration this process did not see (an agent restarted after it).
    dom.reading = (SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED, False)
    assert drv.state("vm") is GuestState.POSTMIGRATE
