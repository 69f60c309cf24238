"""Issue 11: faults inside phases. A dirtying guest that checks its own memory migrates with
its memory intact; the controller SIGKILLed inside precopy (while QEMU copies, and between
QEMU's completion and the controller noticing it) is restarted and ends the migration
completed or rolled back; the same when the source's or the destination's agent is SIGKILLed
mid-migration and restarted; a cancel or a timeout that lands after QEMU completed goes
forward; an agent that does not answer for 5 s around switchover is waited for; the
controller SIGKILLed at a point a seed picks inside a phase (mid-fabric-reconcile, or after
QEMU completed on its own before the controller noticed). Each case ends with the VM on
exactly one host, its memory intact, the fabric in sync, audit clean and no migration left
running (faultkit.check_one_vm). One lab for the whole file; the store's faults (PostgreSQL)
are in test_faults_store.py."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultkit import (
    agent_pid,
    api,
    check_one_vm,
    controller_alive,
    controller_log,
    migrate,
    other_host,
    wait_arrived,
    wait_end,
    wait_failpoint,
)

from labkit import (
    LabRun,
    default_topology,
    kill_controller,
    lab_dir,
    restart_controller,
    running_lab,
)
from vmferry import privileged
from vmferry.lab.ovs_instance import OvsInstance
from vmferry.model.migration import Phase, past_point_of_no_return

# A case: controller restarts (`lab up`), a migration of a dirtying TCG guest and a memory
# check pass; on a loaded 2-core machine that takes minutes.
pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(600)]
log = logging.getLogger(__name__)

VM = "memvm"
VM_IP = "192.0.2.41"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    with running_lab(tmp_path_factory.mktemp("state"), default_topology("t11")) as run:
        run.cli("vm", "create", VM, "--host", "host1", "--vlan", "100", "--ip", f"{VM_IP}/24",
                "--memory", "192", "--workload-mibps", "8", "--memcheck-mib", "16")
        yield run



def test_dirtying_guest_moves_with_memory_intact(lab: LabRun) -> None:
    source, destination = other_host(lab, VM)
    started = json.loads(lab.cli("migrate", VM, "--to", destination, "--detach",
                                 "--json").stdout)
    record = wait_end(lab, started["id"])
    assert record["state"] == "completed", record
    memcheck = record["result"]["memcheck"]
    assert memcheck["passes"] >= 1 and memcheck["failures"] == 0, memcheck
    check_one_vm(lab, VM, VM_IP, record, source, destination)


@pytest.mark.parametrize("point", ["inside:precopy-copying", "inside:precopy-completed"])
def test_controller_killed_inside_precopy(lab: LabRun, point: str) -> None:
    source, destination = other_host(lab, VM)
    kill_controller(lab)
    restart_controller(lab, point)
    since = controller_log(lab).stat().st_size
    migration_id = migrate(lab, VM, destination)
    wait_failpoint(lab, migration_id, point, since)
    kill_controller(lab)
    restart_controller(lab)
    record = wait_end(lab, migration_id)
    assert record["state"] in {"completed", "rolled-back"}, record
    if point == "inside:precopy-completed":
        assert record["state"] == "completed", record     # QEMU's truth: it had completed
    check_one_vm(lab, VM, VM_IP, record, source, destination)


@pytest.mark.parametrize("end", ["destination", "source"])
def test_agent_killed_mid_migration_then_restarted(lab: LabRun, end: str) -> None:
    source, destination = other_host(lab, VM)
    migration_id = migrate(lab, VM, destination)
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
    check_one_vm(lab, VM, VM_IP, record, source, destination)


@pytest.mark.parametrize("late", ["cancel", "timeout"])
def test_cancel_or_timeout_landing_after_qemu_completed_goes_forward(
        lab: LabRun, late: str, tmp_path: Path) -> None:
    """The controller stalls while it still believes QEMU copying; meanwhile QEMU completes.
    The operator's cancel (or the convergence timeout) it then acts on must not roll back:
    the destination runs the only copy of the VM."""
    source, destination = other_host(lab, VM)
    release = tmp_path / "release"
    kill_controller(lab)
    restart_controller(lab, "inside:precopy-copying=240", release)
    try:
        since = controller_log(lab).stat().st_size
        timeout_s = 20 if late == "timeout" else 300
        # Without make-before-break QEMU needs no controller to complete.
        migration_id = migrate(lab, VM, destination, make_before_break=False, timeout_s=timeout_s)
        # The controller times the copy from the start of its precopy phase; the failpoint
        # is on a progress poll of that phase, so it started no later than this.
        copying = wait_failpoint(lab, migration_id, "inside:precopy-copying", since)
        if late == "cancel":
            api(lab, "POST", f"/v1/migrations/{migration_id}/cancel")
        wait_arrived(lab, VM, destination)
        if late == "timeout":           # the controller's clock runs past the timeout
            time.sleep(max(0.0, copying + timeout_s + 1 - time.monotonic()))
        release.touch()
        record = wait_end(lab, migration_id)
        assert record["state"] == "completed", record
        turned = record["result"].get("turned_forward") or ""
        assert ("cancelled" if late == "cancel" else "converge") in turned, record["result"]
        check_one_vm(lab, VM, VM_IP, record, source, destination)
    finally:
        release.touch()
        kill_controller(lab)
        restart_controller(lab)


def test_agent_unreachable_for_5s_around_switchover(lab: LabRun, tmp_path: Path) -> None:
    """The destination's agent stops answering (SIGSTOP) just before switchover, for 5 s:
    past the point of no return the controller waits for it and completes the move."""
    source, destination = other_host(lab, VM)
    release = tmp_path / "release"
    kill_controller(lab)
    restart_controller(lab, "hold-before:switchover=240", release)
    pid = agent_pid(lab, destination)
    try:
        since = controller_log(lab).stat().st_size
        migration_id = migrate(lab, VM, destination)
        wait_failpoint(lab, migration_id, "hold-before:switchover", since)
        os.kill(pid, signal.SIGSTOP)
        release.touch()
        time.sleep(5)
        os.kill(pid, signal.SIGCONT)
        log.info("agent of %s answers again", destination)
        record = wait_end(lab, migration_id)
        assert record["state"] == "completed", record
        check_one_vm(lab, VM, VM_IP, record, source, destination)
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
    source, destination = other_host(lab, VM)
    release = tmp_path / "release"
    kill_controller(lab)
    restart_controller(lab, "inside:precopy-copying=240", release)
    try:
        since = controller_log(lab).stat().st_size
        migration_id = migrate(lab, VM, destination)
        wait_failpoint(lab, migration_id, "inside:precopy-copying", since)
        restart_vswitchd(lab, destination)
        release.touch()
        record = wait_end(lab, migration_id)
        assert record["state"] in {"completed", "rolled-back"}, record
        check_one_vm(lab, VM, VM_IP, record, source, destination)
    finally:
        release.touch()
        kill_controller(lab)
        restart_controller(lab)


# Controller SIGKILL at points a seed picks (issue 11: "random points inside phases, with several
# random seeds per run"). Each seed picks one kind of point and where inside it; the same seed
# replays the same choice (VMFERRY_FAULT_SEEDS=7,8 runs other seeds). The default seeds were
# picked so that each kind is taken at least once (checked below): the kill costs a lab case
# each, so a few seeds rather than many.
KILL_POINTS = ("fabric-reconcile", "qemu-completed-unnoticed")
# Switch trunk ends a move of the VM between the racks writes: 5 carrying VLAN 100 to the far
# rack (tor-spine both ends, spine-tor both ends, the far tor's host port) and 1 pruning it
# from the near tor's host port, in either direction the order flipped.
FABRIC_WRITES_PER_MOVE = 6
SEEDS = [int(s) for s in os.environ.get("VMFERRY_FAULT_SEEDS", "2,5,1").split(",")]


@dataclass(frozen=True)
class KillPlan:
    seed: int
    point: str
    write: int          # fabric-reconcile: the trunk end write after which the controller dies
    delay: float        # qemu-completed-unnoticed: seconds after QEMU completed


def kill_plan(seed: int) -> KillPlan:
    rng = random.Random(seed)
    return KillPlan(seed, rng.choice(KILL_POINTS), rng.randint(1, FABRIC_WRITES_PER_MOVE),
                    round(rng.uniform(0.0, 3.0), 2))


def test_default_seeds_take_every_kind_of_point() -> None:
    if "VMFERRY_FAULT_SEEDS" in os.environ:
        pytest.skip("seeds chosen by hand (VMFERRY_FAULT_SEEDS)")
    assert {kill_plan(seed).point for seed in SEEDS} == set(KILL_POINTS)


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed-{s}" for s in SEEDS])
def test_controller_killed_at_a_seeded_point_inside_a_phase(
        lab: LabRun, seed: int, tmp_path: Path) -> None:
    """``fabric-reconcile``: the controller dies right after the Nth trunk end of the move
    was written (the others of that reconcile may or may not be): before switchover it rolls
    back, after it completes. ``qemu-completed-unnoticed``: QEMU completes on its own (no
    make-before-break gate) while the controller is stalled on a progress read that still saw
    it copying; the controller dies some seconds later without having seen the completion,
    and the restarted one must go forward from QEMU's truth."""
    plan = kill_plan(seed)
    print(f"seed {seed}: {plan}")
    log.info("seed %d: %s", seed, plan)
    source, destination = other_host(lab, VM)
    release = tmp_path / "release"
    fabric = plan.point == "fabric-reconcile"
    point = "inside:fabric-reconcile" if fabric else "inside:precopy-copying"
    kill_controller(lab)
    restart_controller(lab, f"{point}@{plan.write}" if fabric else f"{point}=240", release)
    try:
        since = controller_log(lab).stat().st_size
        migration_id = migrate(lab, VM, destination,
                               **({} if fabric else {"make_before_break": False}))
        wait_failpoint(lab, migration_id, point, since)
        if not fabric:
            wait_arrived(lab, VM, destination)
            time.sleep(plan.delay)
        phase = Phase(api(lab, "GET", f"/v1/migrations/{migration_id}")["phase"])
        kill_controller(lab)
        log.info("controller killed in phase %s", phase.value)
    finally:
        release.touch()
        if controller_alive(lab):
            kill_controller(lab)
        restart_controller(lab)
    record = wait_end(lab, migration_id)
    if fabric:
        expected = "completed" if past_point_of_no_return(phase) else "rolled-back"
        assert phase in (Phase.EXTEND_VLAN, Phase.PRUNE_VLAN), phase
    else:
        expected = "completed"          # QEMU's truth: it had completed
    assert record["state"] == expected, (plan, phase, record)
    check_one_vm(lab, VM, VM_IP, record, source, destination)
