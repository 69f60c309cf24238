"""Issue 14: where a VM may go and why not, a refused migration that changes nothing, a
drain that empties a host while every VM keeps answering, and balancing that moves a busy
guest (CPU read from QEMU) off its host (one lab for the module)."""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from labkit import LabRun, running_lab

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(900)]

# Three racks behind a spine. rack3 is the secure zone, and its ToR link may carry only VLAN
# 300; host3's softswitch is declared without meters (so it cannot realize rate limits).
TOPOLOGY: dict[str, Any] = {
    "name": "tpl", "kind": "lab", "migration_network": "203.0.113.0/24",
    "vlans": [{"id": 100, "subnet": "192.0.2.0/24"}, {"id": 300, "subnet": "198.51.100.0/24"}],
    "switches": [{"name": "spine", "role": "spine"}, {"name": "tor1", "rack": "rack1"},
                 {"name": "tor2", "rack": "rack2"}, {"name": "tor3", "rack": "rack3"}],
    "links": [{"a": "tor1", "b": "spine"}, {"a": "tor2", "b": "spine"},
              {"a": "tor3", "b": "spine", "vlans": [300]}],
    "racks": [{"name": "rack1", "tor": "tor1"}, {"name": "rack2", "tor": "tor2"},
              {"name": "rack3", "tor": "tor3"}],
    "hosts": [{"name": "host1", "rack": "rack1", "memory_mib": 1024},
              {"name": "host2", "rack": "rack1", "memory_mib": 1024},
              {"name": "host3", "rack": "rack2", "memory_mib": 1024,
               "softswitch_features": []},
              {"name": "host4", "rack": "rack2", "memory_mib": 1024},
              {"name": "host5", "rack": "rack3", "memory_mib": 1024, "zone": "secure"}],
    "clients": [{"name": "client-100", "switch": "tor1", "vlan": 100, "ip": "192.0.2.1/24"}],
}
PROFILE = """
name: metered
vlan: 100
qos:
  to_vm: {rate_kbps: 50000, burst_kb: 5000}
"""
IPS = {"web1": "192.0.2.11", "vm2": "192.0.2.12", "vm3": "192.0.2.13", "vm4": "192.0.2.14"}
BUSY_IP = "192.0.2.15"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    with running_lab(tmp_path_factory.mktemp("state"), TOPOLOGY) as run:
        profile = run.state_dir / "metered.yaml"
        profile.write_text(PROFILE)
        run.cli("profile", "apply", "-f", str(profile))
        run.cli("vm", "create", "web1", "--host", "host1", "--profile", "metered",
                "--ip", f"{IPS['web1']}/24", "--memory", "192")
        run.cli("vm", "policy", "web1", "--anti-affinity", "front", "--forbidden-host", "host2")
        yield run


def where(lab: LabRun, vm: str) -> dict[str, list[str]]:
    out = lab.json("where", vm)
    return {h["host"]: [r["code"] for r in h["reasons"]] for h in out["hosts"]}


def assert_clean(lab: LabRun) -> None:
    assert all(t["in_sync"] for t in lab.json("fabric", "show"))
    audit = lab.cli("audit", check=False)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_where_gives_yes_no_and_every_reason(lab: LabRun) -> None:
    got = where(lab, "web1")
    assert got == {"host1": ["current"], "host2": ["forbidden"], "host3": ["profile"],
                   "host4": [], "host5": ["zone", "vlan"]}
    text = lab.cli("where", "web1").stdout
    assert "host4" in text and "forbidden" in text and "lacks" in text


def test_migrate_to_refused_host_fails_with_the_same_reason_and_changes_nothing(
        lab: LabRun) -> None:
    assert lab.wait_ping("client-100", IPS["web1"])
    before = lab.json("fabric", "show")
    refused = next(h for h in lab.json("where", "web1")["hosts"] if h["host"] == "host5")
    result = lab.cli("migrate", "web1", "--to", "host5", "--json", check=False, timeout=300)
    assert result.returncode != 0
    record = lab.json("migration", "list")[0]
    assert record["vm"] == "web1" and record["state"] == "rolled-back"
    for reason in refused["reasons"]:
        assert reason["message"] in record["error"]
    vm = lab.json("vm", "show", "web1")
    assert vm["host"] == "host1" and vm["state"] == "running"
    assert lab.json("fabric", "show") == before
    assert lab.pings("client-100", IPS["web1"])
    assert_clean(lab)


def test_drain_empties_the_host_keeping_every_vm_reachable(lab: LabRun) -> None:
    for vm, host in (("vm2", "host1"), ("vm3", "host1"), ("vm4", "host2")):
        lab.cli("vm", "create", vm, "--host", host, "--vlan", "100",
                "--ip", f"{IPS[vm]}/24", "--memory", "192")
    lab.cli("vm", "policy", "vm4", "--anti-affinity", "front")
    for ip in IPS.values():
        assert lab.wait_ping("client-100", ip)
    pingers = {vm: subprocess.Popen(
        ["ip", "netns", "exec", lab.namespace("client-100"), "ping", "-q", "-i", "0.1",
         "-W", "1", "-w", "600", ip], stdout=subprocess.PIPE, text=True)
        for vm, ip in IPS.items()}
    try:
        job = lab.json("host", "drain", "host1")
    finally:
        losses = {vm: _stop(p) for vm, p in pingers.items()}
    assert job["state"] == "done", job
    placed = {v["name"]: v["host"] for v in lab.json("vm", "list")}
    assert "host1" not in placed.values()
    assert placed["web1"] == "host4"            # not host2 (anti-affinity), not host3 (meters)
    assert "host5" not in placed.values()
    for vm, (sent, lost) in losses.items():
        print(f"{vm}: {sent} pings at 100 ms during the drain, {lost} lost")
        assert sent > 0 and lost <= sent // 4, (vm, sent, lost)
        assert lab.pings("client-100", IPS[vm])
    assert where(lab, "vm4")["host1"] == ["state"]      # in maintenance until undrained
    lab.cli("host", "undrain", "host1")
    assert where(lab, "vm4")["host1"] == []
    assert_clean(lab)


def test_drain_refused_up_front_when_a_vm_has_nowhere_to_go(lab: LabRun) -> None:
    lab.cli("vm", "policy", "vm4", "--anti-affinity", "front", "--allowed-host", "host2")
    result = lab.cli("host", "drain", "host2", check=False)
    assert result.returncode == 2
    assert "vm4 has nowhere to go" in result.stderr
    assert "state" not in where(lab, "vm2")["host2"]        # not put in maintenance
    placed = {v["name"]: v["host"] for v in lab.json("vm", "list")}
    assert placed["vm4"] == "host2"


def test_balance_moves_a_busy_guest_off_the_loaded_host(lab: LabRun) -> None:
    # After the drain host1 is empty; the most loaded other host takes a guest whose
    # workload keeps its vCPU busy, as big in memory as its neighbours: on memory alone any
    # of them would do, only the CPU read from QEMU says which one to move.
    placed = {v["name"]: v["host"] for v in lab.json("vm", "list")}
    counts = Counter(h for h in placed.values() if h != "host1")
    loaded = max(sorted(counts), key=lambda h: counts[h])
    lab.cli("vm", "create", "busy1", "--host", loaded, "--vlan", "100", "--memory", "192",
            "--ip", f"{BUSY_IP}/24", "--workload-mibps", "32")
    # The agents read CPU on every heartbeat (2 s); a plan needs two readings of the guest.
    deadline = time.monotonic() + 120
    while True:
        plan = lab.json("balance", "--dry-run", "--max-moves", "1")
        moves = [(m["vm"], m["source"]) for m in plan["moves"]]
        if moves == [("busy1", loaded)] or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert moves == [("busy1", loaded)], plan
    assert plan["state"] == "planned" and plan["cpu_before"][loaded] > plan["cpu_after"][loaded]
    assert {v["name"]: v["host"] for v in lab.json("vm", "list")}["busy1"] == loaded
    text = lab.cli("balance", "--dry-run", "--max-moves", "1").stdout
    assert "cpu before" in text and "busy1" in text
    out = lab.json("balance", "--max-moves", "1")
    assert out["state"] == "done", out
    assert [(m["vm"], m["source"], m["state"]) for m in out["moves"]] == [
        ("busy1", loaded, "completed")]
    placed = {v["name"]: v["host"] for v in lab.json("vm", "list")}
    assert placed["busy1"] not in (loaded, "host5")
    assert placed["web1"] not in ("host2", "host3", "host5")       # forbidden, meters, zone
    assert placed["vm4"] == "host2" and placed["web1"] != placed["vm4"]    # allowed, front
    assert lab.wait_ping("client-100", BUSY_IP)
    assert_clean(lab)


def _stop(proc: subprocess.Popen[str]) -> tuple[int, int]:
    proc.send_signal(2)
    out, _ = proc.communicate(timeout=30)
    match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert match, out
    return int(match.group(1)), int(match.group(1)) - int(match.group(2))
