"""The libvirt driver's pure parts: domain XML, states, versions, capabilities, job stats."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from vmferry.drivers.hypervisor.base import GuestSpec, GuestState, MigrationTuning
from vmferry.drivers.hypervisor.libvirt import LibvirtHypervisor
from vmferry.drivers.hypervisor.libvirt_xml import (
    domain_xml,
    machine_types_from_capabilities,
    progress_from_stats,
    spec_from_domain_xml,
    state_from_libvirt,
    version_from_number,
)
from vmferry.drivers.hypervisor.qemu_cmdline import kernel_append
from vmferry.errors import HypervisorError, InputError
from vmferry.image.builder import GuestImage

SPEC = GuestSpec(name="web1", memory_mib=256, mac="52:54:00:AA:BB:CC", tap="vm-web1",
                 ip_cidr="192.0.2.10/24", gateway="192.0.2.1", workload_mibps=3)


def image(tmp_path: Path) -> GuestImage:
    return GuestImage(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img",
                      kernel_package="k", kernel_version="1", kernel_release="r",
                      busybox_version="b", init_sha256="0", modules=(), built_at="now")


def test_domain_xml_is_the_qmp_guest(tmp_path: Path) -> None:
    xml = domain_xml(SPEC, image(tmp_path), console=Path("/var/log/libvirt/qemu/web1.serial.log"))
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu"                     # TCG, like -accel tcg
    assert root.findtext("os/cmdline") == kernel_append(SPEC)
    assert root.findtext("os/kernel") == str(tmp_path / "vmlinuz")
    assert root.find("os/type").get("machine") == "q35"   # type: ignore[union-attr]
    assert root.findtext("cpu/model") == "qemu64"
    assert root.findtext("on_reboot") == "destroy"        # -no-reboot
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "ethernet"
    assert nic.find("target").attrib == {"dev": "vm-web1", "managed": "no"}  # type: ignore[union-attr]
    assert nic.find("mac").get("address") == "52:54:00:aa:bb:cc"  # type: ignore[union-attr]
    assert nic.find("driver/host").get("csum") == "off"   # type: ignore[union-attr]
    assert spec_from_domain_xml(xml) == {"name": "web1", "mac": "52:54:00:aa:bb:cc",
                                         "tap": "vm-web1", "cmdline": kernel_append(SPEC)}


def test_states_follow_libvirt_numbers() -> None:
    assert state_from_libvirt(libvirt.VIR_DOMAIN_RUNNING, 1) is GuestState.RUNNING
    assert state_from_libvirt(libvirt.VIR_DOMAIN_PAUSED,
                              libvirt.VIR_DOMAIN_PAUSED_MIGRATION) is GuestState.INMIGRATE
    assert state_from_libvirt(libvirt.VIR_DOMAIN_PAUSED,
                              libvirt.VIR_DOMAIN_PAUSED_USER) is GuestState.PAUSED
    assert state_from_libvirt(libvirt.VIR_DOMAIN_SHUTOFF,
                              libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED) is GuestState.POSTMIGRATE
    assert state_from_libvirt(libvirt.VIR_DOMAIN_SHUTOFF,
                              libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED) is GuestState.SHUTDOWN
    assert state_from_libvirt(libvirt.VIR_DOMAIN_CRASHED, 0) is GuestState.SHUTDOWN


def test_versions_and_machine_types() -> None:
    assert version_from_number(10000002) == "10.0.2"
    caps = """<capabilities><guest><arch name='x86_64'>
      <machine canonical='pc-q35-10.0' maxCpus='288'>q35</machine>
      <machine maxCpus='255'>pc-i440fx-10.0</machine><machine>none</machine>
    </arch></guest><guest><arch name='i686'><machine>isapc</machine></arch></guest>
    </capabilities>"""
    assert machine_types_from_capabilities(caps) == ["pc-i440fx-10.0", "pc-q35-10.0", "q35"]


def test_progress_from_job_stats() -> None:
    running = progress_from_stats("active", {"memory_processed": 1000, "memory_remaining": 50,
                                             "memory_total": 2000, "memory_bps": 125_000_000,
                                             "downtime": 40, "memory_dirty_rate": 7})
    assert (running.transferred_bytes, running.remaining_bytes, running.total_bytes) == \
        (1000, 50, 2000)
    assert running.mbps == 1000.0 and running.dirty_pages_rate == 7
    assert running.expected_downtime_ms == 40 and running.downtime_ms is None
    done = progress_from_stats("completed", {"downtime": 12, "time_elapsed": 900})
    assert done.downtime_ms == 12 and done.total_time_ms == 900
    assert progress_from_stats("failed", {}, "boom").error == "boom"


def test_driver_refuses_before_touching_libvirt(tmp_path: Path) -> None:
    """Bad input and what libvirt cannot do are refused without a daemon."""
    driver = LibvirtHypervisor(tmp_path, image(tmp_path), uri="qemu+unix:///system?socket="
                               f"{tmp_path}/none")
    with pytest.raises(InputError, match="uri"):
        driver.migrate("web1", "exec:reboot", MigrationTuning())
    with pytest.raises(HypervisorError, match="before switchover"):
        driver.migrate("web1", "tcp:203.0.113.2:49152",
                       MigrationTuning(pause_before_switchover=True))
    with pytest.raises(HypervisorError, match="pre-switchover"):
        driver.continue_migration("web1")
    with pytest.raises(InputError, match="mac"):
        driver.start(GuestSpec(**{**SPEC.__dict__, "mac": "nope"}))
