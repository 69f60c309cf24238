"""Issue 11: faults inside phases. A dirtying guest that checks its own memory migrates with
its memory intact; the controller SIGKILLed inside precopy (while QEMU copies, and between
QEMU's completion and the controller noticing it) is restarted and ends the migration
completed or rolled back; the same when the source's or the destination's agent is SIGKILLed
mid-migration and restarted; a cancel or a timeout that lands after QEMU completed goes
forward; an agent that does not answer for 5 s around switchover is waited for. Each case
ends with the VM on exactly one host, its memory intact, the fabric in sync, audit clean and
no migration left running. One lab for the whole file."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from labkit import (
    LabRun,
    default_topology,
    kill_controller,
    lab_dir,
    restart_controller,
    running_lab,
)
from vmferry import privileged
from vmferry.agent.service import memcheck_verdict
from vmferry.lab.ovs_instance import OvsInstance

# A case: controller restarts (`lab up`), a migration of a dirtying TCG guest and a memory
# check pass; on a loaded 2-core machine that takes minutes.
pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(600)]
log = logging.getLogger(__name__)

VM = "memvm"
VM_IP = "192.0.2.41"
LIVE = ("running", "rolling-back")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    with running_lab(tmp_path_factory.mktemp("state"), default_topology("t11")) as run:
        run.cli("vm", "create", VM, "--host", "host1", "--vlan", "100", "--ip", f"{VM_IP}/24",
                "--memory", "192", "--workload-mibps", "8", "--memcheck-mib", "16")
        yield run


def api(lab: LabRun, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """The controller's API straight over HTTP: polling through the CLI costs a Python start
    per look."""
    token = (lab_dir(lab) / "secrets" / "admin.token").read_text().strip()
    response = httpx.request(method, f"http://127.0.0.1:{lab.port}{path}", json=body,
                             headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
    return response.json()


def migrate(lab: LabRun, destination: str, **options: Any) -> int:
    record = api(lab, "POST", "/v1/migrations", {"vm": VM, "to": destination, **options})
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


def qemu_hosts(lab: LabRun) -> list[str]:
    hosts = []
    for pidfile in (lab_dir(lab) / "hosts").glob(f"*/guests/{VM}.pid"):
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
        time.sleep(0.5)
    raise AssertionError(f"migration {migration_id} never ended: {record}")


def other_host(lab: LabRun) -> tuple[str, str]:
    source = api(lab, "GET", f"/v1/vms/{VM}")["host"]
    return source, "host3" if source == "host1" else "host1"


def memcheck_passes(lab: LabRun, host: str) -> tuple[int, int]:
    """(passes, failures) the guest's memory check printed on its console on ``host``."""
    console = lab_dir(lab) / "hosts" / host / "guests" / f"{VM}.serial.log"
    verdict = memcheck_verdict(console.read_text(errors="replace"))
    return verdict.passes, verdict.failures


def check_memory_intact(lab: LabRun, record: dict[str, Any], where: str) -> None:
    """A move verified the memory itself (``result.memcheck``); after a rollback the source
    must finish one more pass of its check with no failure (bounded wait)."""
    if record["state"] == "completed":
        memcheck = record["result"]["memcheck"]
        assert memcheck["intact"] is True, memcheck
        return
    passes, failures = memcheck_passes(lab, where)
    deadline = time.monotonic() + 180
    while memcheck_passes(lab, where)[0] <= passes:
        assert time.monotonic() < deadline, "the guest's memory check made no pass"
        time.sleep(1)
    after = memcheck_passes(lab, where)
    assert after[1] == 0 and failures == 0, f"memory check failures on {where}: {after}"


def check_fabric(lab: LabRun, where: str) -> None:
    """VLAN 100 is carried to the VM's host and not to the other one; every trunk in sync."""
    trunks = {(t["a"], t["b"]): t for t in lab.json("fabric", "show")}
    assert all(t["in_sync"] for t in trunks.values()), trunks
    other = "host3" if where == "host1" else "host1"
    assert any(where in ends and 100 in t["desired"] for ends, t in trunks.items()), trunks
    assert not any(other in ends and 100 in t["desired"] for ends, t in trunks.items()), trunks


def check_one_vm(lab: LabRun, record: dict[str, Any], source: str, destination: str) -> None:
    where = api(lab, "GET", f"/v1/vms/{VM}")["host"]
    assert where == (destination if record["state"] == "completed" else source), record
    assert qemu_hosts(lab) == [where], "the VM must run on exactly one host"
    running = [m for m in api(lab, "GET", "/v1/migrations") if m["state"] in LIVE]
    assert running == [], running
    check_memory_intact(lab, record, where)
    log.info("memory intact on %s", where)
    assert lab.wait_ping("client-100", VM_IP, timeout=60)
    check_fabric(lab, where)
    audit = lab.cli("audit", check=False)
    assert audit.returncode == 0, audit.stdout
    log.info("checked: one VM on %s, fabric, audit", where)


def test_dirtying_guest_moves_with_memory_intact(lab: LabRun) -> None:
    source, destination = other_host(lab)
    started = json.loads(lab.cli("migrate", VM, "--to", destination, "--detach",
                                 "--json").stdout)
    record = wait_end(lab, started["id"])
    assert record["state"] == "completed", record
    memcheck = record["result"]["memcheck"]
    assert memcheck["passes"] >= 1 and memcheck["failures"] == 0, memcheck
    check_one_vm(lab, record, source, destination)


@pytest.mark.parametrize("point", ["inside:precopy-copying", "inside:precopy-completed"])
def test_controller_killed_inside_precopy(lab: LabRun, point: str) -> None:
    source, destination = other_host(lab)
    kill_controller(lab)
    restart_controller(lab, point)
    since = controller_log(lab).stat().st_size
    migration_id = migrate(lab, destination)
    wait_failpoint(lab, migration_id, point, since)
    kill_controller(lab)
    restart_controller(lab)
    record = wait_end(lab, migration_id)
    assert record["state"] in {"completed", "rolled-back"}, record
    if point == "inside:precopy-completed":
        assert record["state"] == "completed", record     # QEMU's truth: it had completed
    check_one_vm(lab, record, source, destination)


def agent_pid(lab: LabRun, host: str) -> int:
    return int(json.loads((lab_dir(lab) / "lab.json").read_text())["pids"][f"agent-{host}"])


@pytest.mark.parametrize("end", ["destination", "source"])
def test_agent_killed_mid_migration_then_restarted(lab: LabRun, end: str) -> None:
    source, destination = other_host(lab)
    migration_id = migrate(lab, destination)
    deadline = time.monotonic() + 120
    while api(lab, "GET", f"/v1/migrations/{migration_id}")["phase"] != "precopy":
        assert time.monotonic() < deadline, "the migration never reached precopy"
        time.sleep(0.05)
    time.sleep(0.3)
    pid = agent_pid(lab, destination if end == "destination" else source)
    os.kill(pid, signal.SIGKILL)
    log.info("agent of the %s killed", end)
    time.sleep(2)
    restart_controller(lab)         # `lab up` restarts the dead agent
    record = wait_end(lab, migration_id)
    assert record["state"] in {"completed", "rolled-back"}, record
    check_one_vm(lab, record, source, destination)


def wait_arrived(lab: LabRun, destination: str, timeout: float = 180) -> None:
    """QEMU completed: the guest runs on the destination and its memory check prints there."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if memcheck_passes(lab, destination)[0] >= 1:
                log.info("the guest runs on %s", destination)
                return
        except FileNotFoundError:
            pass
        assert time.monotonic() < deadline, f"the guest never ran on {destination}"
        time.sleep(0.5)


@pytest.mark.parametrize("late", ["cancel", "timeout"])
def test_cancel_or_timeout_landing_after_qemu_completed_goes_forward(
        lab: LabRun, late: str, tmp_path: Path) -> None:
    """The controller stalls while it still believes QEMU copying; meanwhile QEMU completes.
    The operator's cancel (or the convergence timeout) it then acts on must not roll back:
    the destination runs the only copy of the VM."""
    source, destination = other_host(lab)
    release = tmp_path / "release"
    kill_controller(lab)
    restart_controller(lab, "inside:precopy-copying=240", release)
    try:
        since = controller_log(lab).stat().st_size
        timeout_s = 20 if late == "timeout" else 300
        # Without make-before-break QEMU needs no controller to complete.
        migration_id = migrate(lab, destination, make_before_break=False, timeout_s=timeout_s)
        # The controller times the copy from the start of its precopy phase; the failpoint
        # is on a progress poll of that phase, so it started no later than this.
        copying = wait_failpoint(lab, migration_id, "inside:precopy-copying", since)
        if late == "cancel":
            api(lab, "POST", f"/v1/migrations/{migration_id}/cancel")
        wait_arrived(lab, destination)
        if late == "timeout":           # the controller's clock runs past the timeout
            time.sleep(max(0.0, copying + timeout_s + 1 - time.monotonic()))
        release.touch()
        record = wait_end(lab, migration_id)
        assert record["state"] == "completed", record
        turned = record["result"].get("turned_forward") or ""
        assert ("cancelled" if late == "cancel" else "converge") in turned, record["result"]
        check_one_vm(lab, record, source, destination)
    finally:
        release.touch()
        kill_controller(lab)
        restart_controller(lab)


def test_agent_unreachable_for_5s_around_switchover(lab: LabRun, tmp_path: Path) -> None:
    """The destination's agent stops answering (SIGSTOP) just before switchover, for 5 s:
    past the point of no return the controller waits for it and completes the move."""
    source, destination = other_host(lab)
    release = tmp_path / "release"
    kill_controller(lab)
    restart_controller(lab, "hold-before:switchover=240", release)
    pid = agent_pid(lab, destination)
    try:
        since = controller_log(lab).stat().st_size
        migration_id = migrate(lab, destination)
        wait_failpoint(lab, migration_id, "hold-before:switchover", since)
        os.kill(pid, signal.SIGSTOP)
        release.touch()
        time.sleep(5)
        os.kill(pid, signal.SIGCONT)
        log.info("agent of %s answers again", destination)
        record = wait_end(lab, migration_id)
        assert record["state"] == "completed", record
        check_one_vm(lab, record, source, destination)
    finally:
        os.kill(pid, signal.SIGCONT)
        release.touch()
        kill_controller(lab)
        restart_controller(lab)


def restart_vswitchd(lab: LabRun, host: str) -> None:
    """SIGKILL the host's ovs-vswitchd and start it again the way the lab does (its database,
    ovsdb-server and the ports recorded there stay; OpenFlow rules do not survive)."""
    ovs = OvsInstance(host, lab.namespace(host), lab_dir(lab) / "ovs" / host)
    pid = ovs.pids()["ovs-vswitchd"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while privileged.pid_alive(pid):
        assert time.monotonic() < deadline, "ovs-vswitchd did not die"
        time.sleep(0.05)
    base = ovs.base_dir
    subprocess.run(["ip", "netns", "exec", lab.namespace(host), "ovs-vswitchd",
                    f"unix:{ovs.db_socket}", f"--pidfile={base / 'ovs-vswitchd.pid'}",
                    f"--log-file={base / 'ovs-vswitchd.log'}", f"--unixctl={ovs.vswitchd_ctl}",
                    "-vconsole:off", "--detach"],
                   env={**os.environ, "OVS_RUNDIR": str(ovs.rundir), "OVS_LOGDIR": str(base),
                        "OVS_DBDIR": str(base)}, check=True, timeout=60)
    assert "ovs-vswitchd" in ovs.pids()
    log.info("ovs-vswitchd of %s restarted", host)


def test_destination_vswitchd_restarted_during_precopy(lab: LabRun, tmp_path: Path) -> None:
    """The destination's ovs-vswitchd restarts while QEMU copies (the controller held there,
    so the restart lands inside precopy): the move completes or rolls back, nothing lost."""
    source, destination = other_host(lab)
    release = tmp_path / "release"
    kill_controller(lab)
    restart_controller(lab, "inside:precopy-copying=240", release)
    try:
        since = controller_log(lab).stat().st_size
        migration_id = migrate(lab, destination)
        wait_failpoint(lab, migration_id, "inside:precopy-copying", since)
        restart_vswitchd(lab, destination)
        release.touch()
        record = wait_end(lab, migration_id)
        assert record["state"] in {"completed", "rolled-back"}, record
        check_one_vm(lab, record, source, destination)
    finally:
        release.touch()
        kill_controller(lab)
        restart_controller(lab)
