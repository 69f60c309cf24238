"""Issue 11: faults inside phases. A dirtying guest that checks its own memory migrates with
its memory intact; the controller SIGKILLed inside precopy (while QEMU copies, and between
QEMU's completion and the controller noticing it) is restarted and ends the migration
completed or rolled back: the VM on exactly one host, its memory intact, audit clean; the
same when the source's or the destination's agent is SIGKILLed mid-migration and restarted."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_crash_recovery import kill_controller, lab_dir, restart_controller, wait_failpoint

from labkit import LabRun, default_topology, running_lab
from vmferry import privileged

# Not run by make test until verified on the merged main (reason below).
UNVERIFIED = pytest.mark.xfail(run=False, reason=(
    "issue 11: written, never run to completion (lab up timed out on the overloaded machine);"
    " not verified yet"))
pytestmark = [UNVERIFIED, pytest.mark.root, pytest.mark.slow]

VM = "memvm"
VM_IP = "192.0.2.41"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    with running_lab(tmp_path_factory.mktemp("state"), default_topology("t11")) as run:
        run.cli("vm", "create", VM, "--host", "host1", "--vlan", "100", "--ip", f"{VM_IP}/24",
                "--memory", "192", "--workload-mibps", "8", "--memcheck-mib", "16")
        yield run


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
        record = lab.json("migration", "show", str(migration_id))
        if record["state"] not in ("running", "rolling-back"):
            return record
        time.sleep(0.5)
    raise AssertionError(f"migration {migration_id} never ended: {record}")


def other_host(lab: LabRun) -> tuple[str, str]:
    source = lab.json("vm", "show", VM)["host"]
    return source, "host3" if source == "host1" else "host1"


def check_one_vm(lab: LabRun, record: dict[str, Any], source: str, destination: str) -> None:
    where = lab.json("vm", "show", VM)["host"]
    assert where == (destination if record["state"] == "completed" else source), record
    assert qemu_hosts(lab) == [where], "the VM must run on exactly one host"
    if record["state"] == "completed":
        memcheck = record["result"]["memcheck"]
        assert memcheck["intact"] is True, memcheck
    assert lab.wait_ping("client-100", VM_IP, timeout=60)
    audit = lab.cli("audit", check=False)
    assert audit.returncode == 0, audit.stdout


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
    started = json.loads(lab.cli("migrate", VM, "--to", destination, "--detach",
                                 "--json").stdout)
    wait_failpoint(lab, started["id"], point)
    kill_controller(lab)
    restart_controller(lab, None)
    record = wait_end(lab, started["id"])
    assert record["state"] in {"completed", "rolled-back"}, record
    if point == "inside:precopy-completed":
        assert record["state"] == "completed", record     # QEMU's truth: it had completed
    check_one_vm(lab, record, source, destination)


def agent_pid(lab: LabRun, host: str) -> int:
    return int(json.loads((lab_dir(lab) / "lab.json").read_text())["pids"][f"agent-{host}"])


@pytest.mark.parametrize("end", ["destination", "source"])
def test_agent_killed_mid_migration_then_restarted(lab: LabRun, end: str) -> None:
    source, destination = other_host(lab)
    started = json.loads(lab.cli("migrate", VM, "--to", destination, "--detach",
                                 "--json").stdout)
    deadline = time.monotonic() + 120
    while lab.json("migration", "show", str(started["id"]))["phase"] != "precopy":
        assert time.monotonic() < deadline, "the migration never reached precopy"
        time.sleep(0.05)
    time.sleep(0.3)
    pid = agent_pid(lab, destination if end == "destination" else source)
    os.kill(pid, signal.SIGKILL)
    time.sleep(2)
    restart_controller(lab, None)         # `lab up` restarts the dead agent
    record = wait_end(lab, started["id"])
    assert record["state"] in {"completed", "rolled-back"}, record
    check_one_vm(lab, record, source, destination)
