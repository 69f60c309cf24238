"""What the libvirt driver tells libvirt and reads back from it (pure, no I/O): the domain XML
of a GuestSpec, run states, machine types and migration statistics.

The domain is the QMP driver's guest in libvirt's words: the same kernel, initrd and kernel
command line (``qemu_cmdline.kernel_append``), TCG with a ``qemu64`` CPU, no reboot, the NIC
on vmferry's own tap (``<interface type='ethernet'>`` with ``managed='no'``: vmferry creates
the tap and plugs its port; libvirt only opens it), no offloads on that tap (OVS's userspace
datapath forwards partially checksummed frames as they are, like ``vnet_hdr=off`` there). The
seccomp sandbox is libvirt's own: ``seccomp_sandbox`` (default on) gives QEMU the same
``-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from vmferry.drivers.hypervisor.base import GuestSpec, GuestState, MigrationProgress
from vmferry.drivers.hypervisor.qemu_cmdline import kernel_append
from vmferry.image.builder import GuestImage

__all__ = [
    "domain_xml",
    "machine_types_from_capabilities",
    "progress_from_stats",
    "spec_from_domain_xml",
    "state_from_libvirt",
    "version_from_number",
]

# libvirt's virDomainState and the reasons that matter here (libvirt-domain.h; the python
# binding has the same numbers as VIR_DOMAIN_* constants: kept here so this module is pure).
_RUNNING, _PAUSED, _SHUTDOWN, _SHUTOFF, _CRASHED, _PMSUSPENDED = 1, 3, 4, 5, 6, 7
_PAUSED_MIGRATION, _PAUSED_POSTCOPY, _PAUSED_POSTCOPY_FAILED = 2, 12, 13
_SHUTOFF_MIGRATED = 4


def domain_xml(spec: GuestSpec, image: GuestImage, *, console: Path,
               emulator: str = "/usr/bin/qemu-system-x86_64") -> str:
    """The domain definition of ``spec``. Source and destination run from the same XML (it
    travels with the migration): every path in it must name the same thing on both hosts,
    so the console lives in each host daemon's own log directory (``console``)."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine=spec.machine).text = "hvm"
    ET.SubElement(os_el, "kernel").text = str(image.kernel)
    ET.SubElement(os_el, "initrd").text = str(image.initrd)
    ET.SubElement(os_el, "cmdline").text = kernel_append(spec)
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    cpu = ET.SubElement(dom, "cpu", mode="custom", match="exact", check="none")
    ET.SubElement(cpu, "model", fallback="forbid").text = "qemu64"
    # -no-reboot: a guest that panics (panic=1) ends instead of looping.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = emulator
    nic = ET.SubElement(devices, "interface", type="ethernet")
    ET.SubElement(nic, "mac", address=spec.mac.lower())
    ET.SubElement(nic, "target", dev=spec.tap, managed="no")
    ET.SubElement(nic, "model", type="virtio")
    driver = ET.SubElement(nic, "driver", name="qemu")
    ET.SubElement(driver, "host", csum="off", gso="off", tso4="off", tso6="off", ecn="off",
                  ufo="off")
    ET.SubElement(driver, "guest", csum="off", tso4="off", tso6="off", ecn="off", ufo="off")
    ET.SubElement(nic, "rom", enabled="no")       # no iPXE: the kernel is loaded directly
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console))
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def spec_from_domain_xml(xml: str) -> dict[str, str]:
    """The vmferry identity a domain carries: name, MAC, tap and kernel parameters."""
    root = ET.fromstring(xml)
    found = {"name": root.findtext("name") or ""}
    nic = root.find("devices/interface")
    if nic is not None:
        mac, target = nic.find("mac"), nic.find("target")
        found["mac"] = mac.get("address", "") if mac is not None else ""
        found["tap"] = target.get("dev", "") if target is not None else ""
    found["cmdline"] = root.findtext("os/cmdline") or ""
    return found


def state_from_libvirt(state: int, reason: int) -> GuestState:
    """GuestState for libvirt's (state, reason) of an existing domain."""
    if state == _RUNNING:
        return GuestState.RUNNING
    if state == _PAUSED:
        # An incoming domain waits paused with reason "migration"; so does a source in its
        # last round, but the migration job, not the state, tells those apart.
        return GuestState.INMIGRATE if reason == _PAUSED_MIGRATION else GuestState.PAUSED
    if state == _SHUTOFF:
        return GuestState.POSTMIGRATE if reason == _SHUTOFF_MIGRATED else GuestState.SHUTDOWN
    if state in (_SHUTDOWN, _CRASHED):
        return GuestState.SHUTDOWN
    return GuestState.PAUSED


def version_from_number(number: int) -> str:
    """"10.0.2" from libvirt's 10000002 (major * 1,000,000 + minor * 1,000 + release)."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def machine_types_from_capabilities(xml: str, arch: str = "x86_64") -> list[str]:
    """Machine types (and their canonical names) libvirt's QEMU offers for TCG guests."""
    names: set[str] = set()
    for guest in ET.fromstring(xml).findall("guest"):
        arch_el = guest.find("arch")
        if arch_el is None or arch_el.get("name") != arch:
            continue
        for machine in arch_el.iter("machine"):
            if machine.text:
                names.add(machine.text)
            if machine.get("canonical"):
                names.add(str(machine.get("canonical")))
    names.discard("none")
    return sorted(names)


def _int(stats: Mapping[str, object], key: str) -> int:
    value = stats.get(key)
    return int(value) if isinstance(value, int | float) else 0


def _opt_int(stats: Mapping[str, object], key: str) -> int | None:
    value = stats.get(key)
    return int(value) if isinstance(value, int | float) else None


def progress_from_stats(status: str, stats: Mapping[str, object],
                        error: str | None = None) -> MigrationProgress:
    """MigrationProgress from libvirt's job statistics (``virDomainGetJobStats``: bytes,
    pages/s, ms). ``status`` uses QEMU's words; libvirt's ``downtime`` is the expected one
    while the job runs and the measured one once it completed."""
    completed = status == "completed"
    page_size = _int(stats, "memory_page_size") or 4096
    extra: dict[str, object] = {k: stats[k] for k in (
        "memory_iteration", "memory_normal", "memory_constant", "memory_postcopy_requests",
        "memory_page_size", "operation") if k in stats}
    return MigrationProgress(
        status=status,
        transferred_bytes=_int(stats, "memory_processed"),
        remaining_bytes=_int(stats, "memory_remaining"),
        total_bytes=_int(stats, "memory_total"),
        dirty_pages_rate=_int(stats, "memory_dirty_rate"),
        mbps=_int(stats, "memory_bps") * 8 / 1e6,
        expected_downtime_ms=None if completed else _opt_int(stats, "downtime"),
        downtime_ms=_opt_int(stats, "downtime") if completed else None,
        total_time_ms=_opt_int(stats, "time_elapsed"),
        setup_time_ms=_opt_int(stats, "setup_time"),
        cpu_throttle_percent=_int(stats, "auto_converge_throttle"),
        dirty_sync_count=_int(stats, "memory_iteration"),
        error=error,
        extra={**extra, "page_size": page_size},
    )
