"""The QEMU command line of a guest and the inputs that go into it, checked (pure, no I/O).

Each guest is one detached QEMU (it outlives the agent that started it). Everything of a
guest lives in ``run_dir`` under its name::

    <name>.pid         QEMU's pidfile: how a restarted agent finds its guests
    <name>.qmp         QMP unix socket
    <name>.serial.log  the guest console (look for "VMFERRY-READY name=...")
    <name>.qemu.log    QEMU's own stdout and stderr
    <name>.spec.json   the GuestSpec it was started with
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path

from vmferry import privileged
from vmferry.drivers.hypervisor.base import NIC_SLOTS, GuestNic, GuestSpec, GuestState
from vmferry.errors import HypervisorError, InputError
from vmferry.image.builder import GuestImage

__all__ = [
    "MIN_QEMU_VERSION",
    "READY_MARKER",
    "SANDBOX",
    "guest_files",
    "kernel_append",
    "parse_kernel_append",
    "qemu_argv",
    "state_from_status",
    "validate_spec",
    "version_from_text",
]

MIN_QEMU_VERSION = (10, 0)
READY_MARKER = "VMFERRY-READY"
#: seccomp: no obsolete syscalls, no setuid/setgid, no fork/exec (so an ``exec:`` migration
#: URI that slipped through runs nothing), no scheduler/affinity changes.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
SUN_PATH_MAX = 107          # sockaddr_un.sun_path is 108 bytes with its NUL


SHORT_SOCKET_ROOT = Path("/run/vmferry")


def guest_files(run_dir: Path, name: str) -> dict[str, Path]:
    """Every file a guest may own in ``run_dir``, by role. The QMP socket moves to a short
    directory named after a hash of ``run_dir`` when ``run_dir`` is too long for a socket."""
    qmp = run_dir / f"{name}.qmp"
    if len(str(qmp)) > SUN_PATH_MAX:
        digest = hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]
        qmp = SHORT_SOCKET_ROOT / f"qmp-{digest}" / f"{name}.qmp"
    return {
        "pid": run_dir / f"{name}.pid",
        "qmp": qmp,
        "serial": run_dir / f"{name}.serial.log",
        "log": run_dir / f"{name}.qemu.log",
        "spec": run_dir / f"{name}.spec.json",
    }


def validate_spec(spec: GuestSpec) -> None:
    """Reject specs that would break the command line or the file layout. Raises InputError."""
    if not NAME_RE.match(spec.name):
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
    if spec.nic_slot not in NIC_SLOTS:
        raise InputError("nic_slot", f"one of {NIC_SLOTS}", vm=spec.name)
    if spec.aux_nic is not None:
        validate_nic(spec.name, spec.aux_nic)
        if spec.aux_nic.slot == spec.nic_slot:
            raise InputError("aux_nic", f"slot {spec.nic_slot} holds the main NIC",
                             vm=spec.name)
    if not re.match(r"^[A-Za-z0-9_.-]+$", spec.machine):
        raise InputError("machine", f"not a machine type: {spec.machine!r}", vm=spec.name)


def validate_nic(name: str, nic: GuestNic) -> None:
    """A second NIC's MAC, tap and slot. Raises InputError."""
    if not _MAC_RE.match(nic.mac.lower()) or int(nic.mac[:2], 16) & 1:
        raise InputError("mac", f"not a unicast MAC address: {nic.mac!r}", vm=name)
    if nic.slot not in NIC_SLOTS:
        raise InputError("slot", f"one of {NIC_SLOTS}", vm=name)
    privileged.check_ifname(nic.tap)


def root_port(slot: int) -> str:
    return f"vmfp{slot}"


def nic_device(slot: int) -> str:
    """The QEMU id of the NIC on ``slot`` (its netdev is ``n<slot>``): the same on both ends
    of a migration, whichever host-local tap backs it."""
    return f"nic{slot}"


def hotplug_machine(machine: str) -> bool:
    """q35 machines can get the root ports a NIC can be hot-plugged on."""
    return machine == "q35" or machine.startswith("pc-q35")


def hotplug_ports(spec: GuestSpec) -> bool:
    """Whether the guest has root ports (asked for, on a q35 machine)."""
    return spec.hotplug_ports and hotplug_machine(spec.machine)


def nic_args(mac: str, tap: str, slot: int | None) -> list[str]:
    """-netdev/-device of one NIC. vnet_hdr=off: no checksum/segmentation offload metadata on
    the tap, so frames leave the guest complete; OVS's userspace (netdev) datapath would
    forward partial-checksum frames as they are. romfile=: no iPXE, the kernel is loaded
    directly; it also keeps iPXE's banner off the console."""
    bus = "" if slot is None else f",bus={root_port(slot)}"
    index = slot or 0
    return ["-netdev", f"tap,id=n{index},ifname={tap},script=no,downscript=no,vnet_hdr=off",
            "-device", f"virtio-net-pci,id={nic_device(index)},netdev=n{index},"
                       f"mac={mac.lower()},romfile={bus}"]


def kernel_append(spec: GuestSpec) -> str:
    """The kernel command line that gives the guest its identity (read by image/init.sh).

    ``panic=1`` with QEMU's ``-no-reboot``: a crashed guest ends its QEMU instead of looping."""
    words = ["console=ttyS0", "quiet", "panic=1", f"vmferry.name={spec.name}",
             f"vmferry.ip={spec.ip_cidr}"]
    if spec.gateway:
        words.append(f"vmferry.gw={spec.gateway}")
    words.append(f"vmferry.workload={spec.workload_mibps}")
    if spec.memcheck_mib:
        words.append(f"vmferry.memcheck={spec.memcheck_mib}")
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
    # Capabilities (postcopy-ram) must be set before the listener opens: migrate-incoming.
    incoming_args = ["-incoming", "defer"] if incoming else []
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
        "-qmp", f"unix:{files['qmp']},server=on,wait=off",
        "-pidfile", str(files["pid"]),
        "-sandbox", SANDBOX,
    ]
    # Every guest gets both root ports (source and destination must have the same devices;
    # q35's root bus takes no hot-plug), its NIC on one of them.
    if not hotplug_ports(spec):
        return argv + nic_args(spec.mac, spec.tap, None) + incoming_args
    for slot in NIC_SLOTS:
        argv += ["-device", f"pcie-root-port,id={root_port(slot)},chassis={slot + 1},"
                            f"bus=pcie.0"]
    argv += nic_args(spec.mac, spec.tap, spec.nic_slot)
    if spec.aux_nic is not None:
        argv += nic_args(spec.aux_nic.mac, spec.aux_nic.tap, spec.aux_nic.slot)
    return argv + incoming_args


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


def version_from_text(text: str) -> str:
    match = re.search(r"version (\d+\.\d+(?:\.\d+)?)", text)
    if not match:
        raise HypervisorError("cannot parse the QEMU version", cause=text.strip()[:200])
    return match.group(1)
