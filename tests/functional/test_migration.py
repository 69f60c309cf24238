"""Issue 4: live migration with the network in tow, rollback, and `vmferry audit`."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from labkit import LabRun, default_topology, guest_traces, running_lab, trunks
from vmferry.lab.ovs_instance import OvsInstance

pytestmark = [pytest.mark.root, pytest.mark.slow]

VM_IP = "192.0.2.10"
HERE = Path(__file__).parent
# On a loaded 2-core machine under TCG: the tight figure is the benchmark's business.
MAX_LOST_AT_2MS = 250


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    with running_lab(tmp_path_factory.mktemp("state"), default_topology("t4")) as run:
        yield run


def host_has(lab: LabRun, host: str, vm: str) -> list[str]:
    """What of ``vm`` is on ``host``: tap, OVS port, guest files, profile flows and meters."""
    found = guest_traces(lab, host, vm)
    # Flows and meters a port profile installed (the bridge's own NORMAL flow has cookie 0).
    ovs = OvsInstance(host, lab.namespace(host), lab.state_dir / "labs" / lab.name / "ovs" / host)
    mgmt = f"unix:{ovs.rundir / 'br-vm.mgmt'}"
    flows = subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "dump-flows", mgmt],
                           capture_output=True, text=True, timeout=10).stdout
    if any("cookie=0x0," not in line for line in flows.splitlines()[1:]):
        found.append("flows")
    meters = subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "dump-meters", mgmt],
                            capture_output=True, text=True, timeout=10).stdout
    if "meter=" in meters:
        found.append("meters")
    return found


def start_ping(lab: LabRun, count: int, interval: float = 0.002) -> subprocess.Popen[str]:
    deadline = int(count * interval * 3) + 10
    return subprocess.Popen(["ip", "netns", "exec", lab.namespace("client-100"), "ping", "-q",
                             "-i", str(interval), "-c", str(count), "-w", str(deadline), "-W", "1",
                             VM_IP], stdout=subprocess.PIPE, text=True)


def ping_loss(proc: subprocess.Popen[str]) -> tuple[int, int]:
    proc.send_signal(2)   # SIGINT: ping prints its statistics
    out, _ = proc.communicate(timeout=30)
    match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert match, out
    sent, received = int(match.group(1)), int(match.group(2))
    return sent, sent - received


def hold_tcp(lab: LabRun) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["ip", "netns", "exec", lab.namespace("client-100"),
                             "python3", str(HERE / "tcp_hold.py"), VM_IP, "7"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "OK 1"
    return proc


def tcp_round(proc: subprocess.Popen[str], n: int) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("next\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def migrate_json(lab: LabRun, vm: str, to: str, *extra: str) -> dict[str, Any]:
    result = lab.cli("migrate", vm, "--to", to, "--json", *extra, check=False, timeout=400)
    assert result.stdout, result.stderr
    record: dict[str, Any] = json.loads(result.stdout)
    return record


PROFILE = {"name": "mig-web", "vlan": 100,
           "acl": {"to_vm": {"default": "allow",
                             "rules": [{"action": "deny", "protocol": "tcp", "port": 8080}]}}}


def acl_enforced(lab: LabRun, wait_s: float = 30) -> bool:
    """HTTP on 80 answers and HTTP on 8080 is blocked by the profile's ACL. The guest may
    answer pings before its web server listens (seen on a loaded machine: one try failed),
    so port 80 gets a few tries (bounded); 8080 must stay blocked."""
    deadline = time.monotonic() + wait_s
    page = lab.http("client-100", f"http://{VM_IP}/")
    while page is None and time.monotonic() < deadline:
        time.sleep(1)
        page = lab.http("client-100", f"http://{VM_IP}/")
    return page is not None and lab.http("client-100", f"http://{VM_IP}:8080/", timeout=2) is None


@pytest.mark.parametrize("workload", [0, 4])
def test_migrate_across_racks_with_network_in_tow(lab: LabRun, workload: int) -> None:
    vm = f"mig{workload}"
    profiles = lab.state_dir / "mig-profiles.yaml"
    profiles.write_text(yaml.safe_dump(PROFILE))
    lab.cli("profile", "apply", "-f", str(profiles))
    lab.cli("vm", "create", vm, "--host", "host1", "--profile", "mig-web", "--ip", f"{VM_IP}/24",
            "--memory", "256", "--workload-mibps", str(workload))
    try:
        assert lab.wait_ping("client-100", VM_IP)
        assert acl_enforced(lab)
        before = trunks(lab)
        assert before[("tor2", "spine")]["desired"] == []
        assert before[("host3", "tor2")]["desired"] == []
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
        assert record["result"]["qemu"]["downtime_ms"] is not None
        print(f"\nworkload {workload} MiB/s: {sent} pings at 2 ms, {lost} lost; "
              f"QEMU downtime {record['result']['qemu']['downtime_ms']} ms")
        assert sent > 500
        assert lost <= MAX_LOST_AT_2MS
        assert tcp_round(tcp, 2) == "OK 2", "the TCP connection must survive the migration"
        tcp.stdin.close()  # type: ignore[union-attr]
        tcp.wait(timeout=10)
        assert lab.json("vm", "show", vm)["host"] == "host3"
        assert acl_enforced(lab), "the profile's ACL holds on the destination"
        assert host_has(lab, "host1", vm) == []
        assert host_has(lab, "host3", vm) == ["tap", "ovs-port", "guest-files", "flows"]
        after = trunks(lab)
        assert after[("host1", "tor1")]["actual_a"] == []
        assert after[("host1", "tor1")]["actual_b"] == []
        assert after[("host3", "tor2")]["actual_a"] == [100]
        assert after[("tor2", "spine")]["actual_a"] == [100]   # client-100 stays on tor1
        assert all(t["in_sync"] for t in after.values())
        assert lab.cli("audit", check=False).returncode == 0
        assert lab.pings("client-100", VM_IP)
        # And back: a guest that arrived by migration leaves by migration too.
        back = migrate_json(lab, vm, "host1")
        assert back["state"] == "completed", (back["error"], back["phases"])
        assert lab.pings("client-100", VM_IP)
        assert host_has(lab, "host3", vm) == []
        assert lab.cli("audit", check=False).returncode == 0
    finally:
        lab.cli("vm", "delete", vm, check=False)
    assert lab.cli("audit", check=False).returncode == 0
    assert all(not t["desired"] for t in trunks(lab).values())


def _qemu_pid(lab: LabRun, host: str, vm: str) -> int:
    path = lab.state_dir / "labs" / lab.name / "hosts" / host / "guests" / f"{vm}.pid"
    return int(path.read_text().strip())


def _wait_precopy(lab: LabRun, migration_id: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = lab.json("migration", "show", str(migration_id))
        progress = record["result"].get("progress") or {}
        if record["phase"] == "precopy" and progress.get("transferred_bytes", 0) > 0:
            return
        assert record["state"] == "running", record
        time.sleep(0.1)
    raise AssertionError("migration never reached precopy")


def _wait_end(lab: LabRun, migration_id: int, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record: dict[str, Any] = lab.json("migration", "show", str(migration_id))
        if record["state"] not in ("running", "rolling-back"):
            return record
        time.sleep(0.2)
    raise AssertionError("migration did not end")


@pytest.mark.parametrize("failure", ["kill-destination-qemu", "cut-migration-link", "cancel"])
def test_failure_during_precopy_rolls_back(lab: LabRun, failure: str) -> None:
    vm = "rb"
    lab.cli("vm", "create", vm, "--host", "host1", "--vlan", "100", "--ip", f"{VM_IP}/24",
            "--memory", "256", "--workload-mibps", "2")
    try:
        assert lab.wait_ping("client-100", VM_IP)
        fabric_before = trunks(lab)
        timeout = "12" if failure == "cut-migration-link" else "120"
        started = json.loads(lab.cli("migrate", vm, "--to", "host3", "--bandwidth", "40",
                                     "--timeout", timeout, "--detach", "--json").stdout)
        _wait_precopy(lab, started["id"])
        if failure == "kill-destination-qemu":
            subprocess.run(["kill", "-9", str(_qemu_pid(lab, "host3", vm))], check=True)
        elif failure == "cut-migration-link":
            lab.exec("host3", "ip", "link", "set", "mig0", "down")
        else:
            lab.cli("migration", "cancel", str(started["id"]))
        try:
            record = _wait_end(lab, started["id"])
        finally:
            if failure == "cut-migration-link":
                lab.exec("host3", "ip", "link", "set", "mig0", "up")
        assert record["state"] == "rolled-back", record
        assert record["error"]
        assert lab.json("vm", "show", vm)["host"] == "host1"
        assert lab.json("vm", "show", vm)["state"] == "running"
        assert lab.pings("client-100", VM_IP), "the VM keeps running on the source"
        assert host_has(lab, "host3", vm) == []
        assert host_has(lab, "host1", vm) == ["tap", "ovs-port", "guest-files"]
        assert {k: (t["actual_a"], t["actual_b"]) for k, t in trunks(lab).items()} == \
            {k: (t["actual_a"], t["actual_b"]) for k, t in fabric_before.items()}
        assert lab.cli("audit", check=False).returncode == 0
    finally:
        lab.cli("vm", "delete", vm, check=False)


def test_precheck_refusals_and_concurrency(lab: LabRun) -> None:
    lab.cli("vm", "create", "pc", "--host", "host2", "--vlan", "100", "--ip", "192.0.2.11/24",
            "--memory", "256")
    try:
        fabric_before = trunks(lab)
        same = lab.cli("migrate", "pc", "--to", "host2", check=False)
        assert same.returncode == 2 and "already runs on host2" in same.stderr
        unknown = lab.cli("migrate", "pc", "--to", "host9", check=False)
        assert unknown.returncode == 2 and "unknown host" in unknown.stderr
        missing = lab.cli("migrate", "nosuch", "--to", "host3", check=False)
        assert missing.returncode == 2 and "no VM named" in missing.stderr
        big = lab.cli("vm", "create", "big", "--host", "host4", "--vlan", "100",
                      "--ip", "192.0.2.12/24", "--memory", "1900")
        assert big.returncode == 0
        try:
            full = lab.cli("migrate", "pc", "--to", "host4", check=False)
            assert full.returncode == 2 and "MiB free" in full.stderr
        finally:
            lab.cli("vm", "delete", "big")
        started = json.loads(lab.cli("migrate", "pc", "--to", "host3", "--bandwidth", "40",
                                     "--detach", "--json").stdout)
        again = lab.cli("migrate", "pc", "--to", "host4", check=False)
        assert again.returncode == 2 and "already migrating" in again.stderr
        assert _wait_end(lab, started["id"])["state"] == "completed"
        assert {k: t["desired"] for k, t in trunks(lab).items()} != \
            {k: t["desired"] for k, t in fabric_before.items()}
        assert lab.json("migration", "list")[0]["state"] == "completed"
    finally:
        lab.cli("vm", "delete", "pc", check=False)
    assert lab.cli("audit", check=False).returncode == 0
