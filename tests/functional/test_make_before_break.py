"""Issue 6: the temporary make-before-break rules are gone after every migration -- completed,
failed (destination QEMU killed during precopy) or cancelled -- on every switch and host, and
`vmferry audit` reports (and fixes) any that are left. Not timed."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from labkit import LabRun, default_topology, running_lab
from vmferry.controller.switchover import is_mbb_cookie, mbb_cookie

pytestmark = [pytest.mark.root, pytest.mark.slow]

VM_IP = "192.0.2.20"
SWITCHES = ("spine", "tor1", "tor2")
HOSTS = ("host1", "host2", "host3", "host4")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    with running_lab(tmp_path_factory.mktemp("state"), default_topology("mbbt")) as run:
        yield run


def api(lab: LabRun, method: str, path: str, body: Any = None) -> Any:
    token = (lab.state_dir / "labs" / lab.name / "secrets" / "admin.token").read_text().strip()
    response = httpx.request(method, f"http://127.0.0.1:{lab.port}{path}", json=body,
                             headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert response.is_success, response.text
    return response.json() if response.content else None


def switchover_rules(lab: LabRun) -> list[tuple[str, str]]:
    """(node, flow) of every make-before-break rule on every switch and host."""
    found: list[tuple[str, str]] = []
    for node, bridge in [*((s, "br-fabric") for s in SWITCHES), *((h, "br-vm") for h in HOSTS)]:
        mgmt = lab.state_dir / "labs" / lab.name / "ovs" / node / f"{bridge}.mgmt"
        out = subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "dump-flows", f"unix:{mgmt}"],
                             capture_output=True, text=True, timeout=15, check=True).stdout
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("cookie="):
                cookie = int(line.split(",", 1)[0].removeprefix("cookie="), 0)
                if is_mbb_cookie(cookie):
                    found.append((node, line))
    return found


def wait_end(lab: LabRun, migration_id: int, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record: dict[str, Any] = api(lab, "GET", f"/v1/migrations/{migration_id}")
        if record["state"] not in ("running", "rolling-back"):
            return record
        time.sleep(0.2)
    raise AssertionError("migration did not end")


def wait_installed(lab: LabRun, migration_id: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = api(lab, "GET", f"/v1/migrations/{migration_id}")
        if record["result"].get("make_before_break") == "installed":
            return
        assert record["state"] == "running", record
        time.sleep(0.05)
    raise AssertionError("the make-before-break rules were never installed")


def assert_clean(lab: LabRun, record: dict[str, Any]) -> None:
    assert record["result"].get("make_before_break") == "removed", record["result"]
    assert switchover_rules(lab) == []
    audit = lab.cli("audit", check=False)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_rules_are_gone_after_completed_migrations(lab: LabRun) -> None:
    vm = "mbb1"
    lab.cli("vm", "create", vm, "--host", "host1", "--vlan", "100", "--ip", f"{VM_IP}/24",
            "--memory", "256")
    try:
        assert lab.wait_ping("client-100", VM_IP)
        for destination in ("host3", "host1", "host2"):
            started = api(lab, "POST", "/v1/migrations", {"vm": vm, "to": destination})
            record = wait_end(lab, started["id"])
            assert record["state"] == "completed", record
            assert record["result"].get("make_before_break_installs", 0) >= 1, record["result"]
            assert_clean(lab, record)
            assert lab.wait_ping("client-100", VM_IP, timeout=20)
        # Off for one migration: nothing is installed at all.
        started = api(lab, "POST", "/v1/migrations",
                      {"vm": vm, "to": "host4", "make_before_break": False})
        record = wait_end(lab, started["id"])
        assert record["state"] == "completed", record
        assert "make_before_break_installs" not in record["result"]
        assert switchover_rules(lab) == []
    finally:
        lab.cli("vm", "delete", vm, check=False)


@pytest.mark.parametrize("failure", ["kill-destination-qemu", "cancel"])
def test_rules_are_gone_after_a_failed_or_cancelled_migration(lab: LabRun, failure: str) -> None:
    vm = "mbb2"
    lab.cli("vm", "create", vm, "--host", "host1", "--vlan", "100", "--ip", f"{VM_IP}/24",
            "--memory", "256", "--workload-mibps", "2")
    try:
        assert lab.wait_ping("client-100", VM_IP)
        # A slow copy with the rules asked for from its start: they are in place when it fails.
        started = api(lab, "POST", "/v1/migrations", {
            "vm": vm, "to": "host3", "bandwidth_mbps": 40, "timeout_s": 120,
            "make_before_break_lead_s": 3600})
        wait_installed(lab, started["id"])
        on = {node for node, _ in switchover_rules(lab)}
        assert on == {"tor1", "spine", "tor2", "host3"}, on
        if failure == "kill-destination-qemu":
            pidfile = lab.state_dir / "labs" / lab.name / "hosts" / "host3" / "guests" / \
                f"{vm}.pid"
            subprocess.run(["kill", "-9", pidfile.read_text().strip()], check=True)
        else:
            lab.cli("migration", "cancel", str(started["id"]))
        record = wait_end(lab, started["id"])
        assert record["state"] == "rolled-back", record
        assert_clean(lab, record)
        assert lab.pings("client-100", VM_IP), "the VM keeps running on the source"
    finally:
        lab.cli("vm", "delete", vm, check=False)


def test_audit_reports_and_fixes_a_leftover_rule(lab: LabRun) -> None:
    mgmt = lab.state_dir / "labs" / lab.name / "ovs" / "tor2" / "br-fabric.mgmt"
    cookie = mbb_cookie(999_999)        # no such migration is running
    subprocess.run(["ovs-ofctl", "-O", "OpenFlow13", "add-flow", f"unix:{mgmt}",
                    f"cookie={cookie:#x},priority=65000,dl_vlan=100,"
                    "dl_dst=52:54:00:00:99:99,actions=drop"], check=True, timeout=15)
    audit = lab.cli("audit", check=False)
    assert audit.returncode == 1
    assert "switchover-flow" in audit.stdout, audit.stdout
    lab.cli("audit", "--fix", check=False)
    assert switchover_rules(lab) == []
    assert lab.cli("audit", check=False).returncode == 0
