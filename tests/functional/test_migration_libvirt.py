"""Issue 15: the migration tests of issue 4 against hosts that say ``hypervisor: libvirt``:
each host's guests run under its own libvirt daemon (lab/libvirt.py), the agents use the
libvirt driver, and vmferry's network phases run around libvirt's peer-to-peer migration.

Reuses test_migration's and test_make_before_break's helpers. libvirt cannot hold a migration
before switchover, so the make-before-break window never opens here: its rules are computed,
never installed, and nothing of them may be left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_make_before_break import switchover_rules
from test_migration import (
    MAX_LOST_AT_2MS,
    PROFILE,
    VM_IP,
    _wait_end,
    _wait_precopy,
    acl_enforced,
    hold_tcp,
    host_has,
    migrate_json,
    ping_loss,
    start_ping,
    tcp_round,
    trunks,
)

from labkit import LabRun, default_topology, running_lab

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    topology = default_topology("t4lv")
    for host in topology["hosts"]:
        host["hypervisor"] = "libvirt"
    with running_lab(tmp_path_factory.mktemp("state"), topology) as run:
        yield run


def qemu_pid(lab: LabRun, host: str, vm: str) -> int:
    """The pid of ``vm``'s QEMU on ``host``: libvirt names it ``guest=VM`` and it lives in the
    host's network namespace (the other end of a migration runs a QEMU of the same name)."""
    netns = os.stat(f"/run/netns/{lab.namespace(host)}").st_ino
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if f"guest={vm},".encode() in b" ".join(argv) and \
                    os.stat(proc / "ns" / "net").st_ino == netns:
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no QEMU of {vm} on {host}")


def test_libvirt_hosts_are_driven_by_libvirt(lab: LabRun) -> None:
    lab.cli("vm", "create", "lvq", "--host", "host2", "--vlan", "100", "--ip", "192.0.2.30/24",
            "--memory", "256")
    try:
        pid = qemu_pid(lab, "host2", "lvq")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        # Started by libvirt (its secrets object), with libvirt's default seccomp sandbox.
        assert any("masterKey0" in arg for arg in argv)
        assert "-sandbox" in argv
        assert lab.wait_ping("client-100", "192.0.2.30")
    finally:
        lab.cli("vm", "delete", "lvq", check=False)
    assert host_has(lab, "host2", "lvq") == []


def test_libvirt_migration_with_profile_under_ping(lab: LabRun) -> None:
    vm = "lvmig"
    profiles = lab.state_dir / "mig-profiles.yaml"
    profiles.write_text(yaml.safe_dump(PROFILE))
    lab.cli("profile", "apply", "-f", str(profiles))
    lab.cli("vm", "create", vm, "--host", "host1", "--profile", "mig-web", "--ip", f"{VM_IP}/24",
            "--memory", "256", "--workload-mibps", "2")
    try:
        assert lab.wait_ping("client-100", VM_IP)
        assert acl_enforced(lab)
        tcp = hold_tcp(lab)
        pinger = start_ping(lab, count=15000)
        time.sleep(1)
        record = migrate_json(lab, vm, "host3")
        time.sleep(0.5)
        sent, lost = ping_loss(pinger)
        assert record["state"] == "completed", (record["error"], record["phases"])
        assert [p["phase"] for p in record["phases"]] == [
            "precheck", "extend_vlan", "preset_port", "start_destination", "precopy",
            "switchover", "announce", "clean_source", "prune_vlan", "verify"]
        qemu = record["result"]["qemu"]
        assert qemu["status"] == "completed" and qemu["downtime_ms"] is not None
        assert record["result"].get("make_before_break") == "removed", record["result"]
        assert "make_before_break_installs" not in record["result"]
        print(f"\nlibvirt: {sent} pings at 2 ms, {lost} lost; QEMU downtime "
              f"{qemu['downtime_ms']} ms")
        assert sent > 500
        assert lost <= MAX_LOST_AT_2MS
        assert tcp_round(tcp, 2) == "OK 2", "the TCP connection must survive the migration"
        tcp.stdin.close()  # type: ignore[union-attr]
        tcp.wait(timeout=10)
        assert lab.json("vm", "show", vm)["host"] == "host3"
        assert acl_enforced(lab), "the profile's ACL holds on the destination"
        assert host_has(lab, "host1", vm) == []
        assert host_has(lab, "host3", vm) == ["tap", "ovs-port", "guest-files", "flows"]
        assert all(t["in_sync"] for t in trunks(lab).values())
        assert switchover_rules(lab) == []
        assert lab.cli("audit", check=False).returncode == 0
        # And back: a guest that arrived by migration leaves by migration too.
        back = migrate_json(lab, vm, "host1")
        assert back["state"] == "completed", (back["error"], back["phases"])
        assert lab.pings("client-100", VM_IP)
        assert host_has(lab, "host3", vm) == []
        assert switchover_rules(lab) == []
        assert lab.cli("audit", check=False).returncode == 0
    finally:
        lab.cli("vm", "delete", vm, check=False)
    assert lab.cli("audit", check=False).returncode == 0
    assert all(not t["desired"] for t in trunks(lab).values())


def test_libvirt_rollback_when_the_destination_dies(lab: LabRun) -> None:
    vm = "lvrb"
    lab.cli("vm", "create", vm, "--host", "host1", "--vlan", "100", "--ip", f"{VM_IP}/24",
            "--memory", "256", "--workload-mibps", "2")
    try:
        assert lab.wait_ping("client-100", VM_IP)
        fabric_before = trunks(lab)
        started: dict[str, Any] = json.loads(lab.cli(
            "migrate", vm, "--to", "host3", "--bandwidth", "40", "--timeout", "120",
            "--detach", "--json").stdout)
        _wait_precopy(lab, started["id"])
        subprocess.run(["kill", "-9", str(qemu_pid(lab, "host3", vm))], check=True)
        record = _wait_end(lab, started["id"])
        assert record["state"] == "rolled-back", record
        assert record["error"]
        assert record["result"].get("make_before_break") == "removed", record["result"]
        assert lab.json("vm", "show", vm)["host"] == "host1"
        assert lab.json("vm", "show", vm)["state"] == "running"
        assert lab.pings("client-100", VM_IP), "the VM keeps running on the source"
        assert host_has(lab, "host3", vm) == []
        assert host_has(lab, "host1", vm) == ["tap", "ovs-port", "guest-files"]
        assert {k: (t["actual_a"], t["actual_b"]) for k, t in trunks(lab).items()} == \
            {k: (t["actual_a"], t["actual_b"]) for k, t in fabric_before.items()}
        assert switchover_rules(lab) == []
        assert lab.cli("audit", check=False).returncode == 0
    finally:
        lab.cli("vm", "delete", vm, check=False)
