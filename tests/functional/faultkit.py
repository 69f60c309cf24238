"""What the fault tests (test_faults*.py) share: the controller's API over HTTP, waits for a
failpoint, a migration's end or a guest's arrival, and the checks every fault case ends with
(the VM on exactly one host, its memory intact, the fabric as `fabric show` says, audit
clean, no migration left running)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx

from labkit import LabRun, lab_dir
from vmferry import privileged
from vmferry.agent.service import memcheck_verdict

log = logging.getLogger(__name__)

LIVE = ("running", "rolling-back")


def api(lab: LabRun, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """The controller's API straight over HTTP: polling through the CLI costs a Python start
    per look."""
    token = (lab_dir(lab) / "secrets" / "admin.token").read_text().strip()
    response = httpx.request(method, f"http://127.0.0.1:{lab.port}{path}", json=body,
                             headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
    return response.json()


def migrate(lab: LabRun, vm: str, destination: str, **options: Any) -> int:
    record = api(lab, "POST", "/v1/migrations", {"vm": vm, "to": destination, **options})
    log.info("migration %s to %s started", record["id"], destination)
    return int(record["id"])


def controller_log(lab: LabRun) -> Path:
    return lab_dir(lab) / "log" / "controller.log"


def wait_failpoint(lab: LabRun, migration_id: int, point: str, since: int,
                   timeout: float = 120) -> float:
    """Wait until the controller stalls at ``point``: its log says so after byte ``since``
    (the log outlives restarts and earlier cases reached the same points). Returns when
    (``time.monotonic()``) it was seen: the controller got there no later."""
    needle = f"failpoint {point} reached"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with controller_log(lab).open(errors="replace") as f:
            f.seek(since)
            if needle in f.read():
                log.info("failpoint %s reached", point)
                return time.monotonic()
        record = api(lab, "GET", f"/v1/migrations/{migration_id}")
        assert record["state"] == "running", f"migration ended before {point}: {record}"
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} never appeared in {controller_log(lab)}")


def qemu_hosts(lab: LabRun, vm: str) -> list[str]:
    hosts = []
    for pidfile in (lab_dir(lab) / "hosts").glob(f"*/guests/{vm}.pid"):
        pid = privileged.read_pidfile(pidfile)
        if pid and privileged.pid_alive(pid):
            hosts.append(pidfile.parent.parent.name)
    return sorted(hosts)


def wait_end(lab: LabRun, migration_id: int, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        record = api(lab, "GET", f"/v1/migrations/{migration_id}")
        if record["state"] not in LIVE:
            log.info("migration %s ended %s: %s", migration_id, record["state"],
                     record.get("result", {}).get("decisions"))
            return record
        time.sleep(0.2)         # one HTTP GET a look: cheap for the controller
    raise AssertionError(f"migration {migration_id} never ended: {record}")


def other_host(lab: LabRun, vm: str) -> tuple[str, str]:
    source = api(lab, "GET", f"/v1/vms/{vm}")["host"]
    return source, "host3" if source == "host1" else "host1"


def memcheck_passes(lab: LabRun, vm: str, host: str) -> tuple[int, int]:
    """(passes, failures) the guest's memory check printed on its console on ``host``."""
    console = lab_dir(lab) / "hosts" / host / "guests" / f"{vm}.serial.log"
    verdict = memcheck_verdict(console.read_text(errors="replace"))
    return verdict.passes, verdict.failures


def check_memory_intact(lab: LabRun, vm: str, record: dict[str, Any], where: str) -> None:
    """A move verified the memory itself (``result.memcheck``); after a rollback the source
    must finish one more pass of its check with no failure (bounded wait)."""
    if record["state"] == "completed":
        memcheck = record["result"]["memcheck"]
        assert memcheck["intact"] is True, memcheck
        return
    passes, failures = memcheck_passes(lab, vm, where)
    deadline = time.monotonic() + 180
    while memcheck_passes(lab, vm, where)[0] <= passes:
        assert time.monotonic() < deadline, "the guest's memory check made no pass"
        time.sleep(1)
    after = memcheck_passes(lab, vm, where)
    assert after[1] == 0 and failures == 0, f"memory check failures on {where}: {after}"


def check_fabric(lab: LabRun, where: str) -> None:
    """VLAN 100 is carried to the VM's host and not to the other one; every trunk in sync."""
    trunks = {(t["a"], t["b"]): t for t in lab.json("fabric", "show")}
    assert all(t["in_sync"] for t in trunks.values()), trunks
    other = "host3" if where == "host1" else "host1"
    assert any(where in ends and 100 in t["desired"] for ends, t in trunks.items()), trunks
    assert not any(other in ends and 100 in t["desired"] for ends, t in trunks.items()), trunks


def check_one_vm(lab: LabRun, vm: str, vm_ip: str, record: dict[str, Any], source: str,
                 destination: str) -> None:
    """The VM runs on exactly one host (the destination if the move completed, else the
    source), its memory is intact, it answers, the fabric is as `fabric show` says it
    should be (VLAN 100), `audit` is clean and no migration is left running."""
    where = api(lab, "GET", f"/v1/vms/{vm}")["host"]
    assert where == (destination if record["state"] == "completed" else source), record
    assert qemu_hosts(lab, vm) == [where], "the VM must run on exactly one host"
    running = [m for m in api(lab, "GET", "/v1/migrations") if m["state"] in LIVE]
    assert running == [], running
    check_memory_intact(lab, vm, record, where)
    log.info("memory intact on %s", where)
    assert lab.wait_ping("client-100", vm_ip, timeout=60)
    check_fabric(lab, where)
    audit = lab.cli("audit", check=False)
    assert audit.returncode == 0, audit.stdout
    log.info("checked: one VM on %s, fabric, audit", where)

def agent_pid(lab: LabRun, host: str) -> int:
    return int(json.loads((lab_dir(lab) / "lab.json").read_text())["pids"][f"agent-{host}"])


def wait_arrived(lab: LabRun, vm: str, destination: str, timeout: float = 180) -> None:
    """QEMU completed: the guest runs on the destination and its memory check prints there."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if memcheck_passes(lab, vm, destination)[0] >= 1:
                log.info("the guest runs on %s", destination)
                return
        except FileNotFoundError:
            pass
        assert time.monotonic() < deadline, f"the guest never ran on {destination}"
        time.sleep(0.5)




def controller_alive(lab: LabRun) -> bool:
    pid = json.loads((lab_dir(lab) / "lab.json").read_text())["pids"].get("controller")
    return bool(pid) and privileged.pid_alive(int(pid))
