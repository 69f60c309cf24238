"""Issue 5: the controller is SIGKILLed during every phase of a migration; once restarted it
completes or rolls back, the VM runs on exactly one host, and nothing is left behind."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
from faultkit import controller_log, wait_end, wait_failpoint

from labkit import (
    VMFERRY,
    LabRun,
    default_topology,
    free_port,
    kill_controller,
    lab_dir,
    restart_controller,
    running_lab,
)
from vmferry import privileged
from vmferry.model.migration import PHASES, Phase, past_point_of_no_return

pytestmark = [pytest.mark.root, pytest.mark.slow]

VM = "crashy"
VM_IP = "192.0.2.40"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    with running_lab(tmp_path_factory.mktemp("state"), default_topology("t5")) as run:
        run.cli("vm", "create", VM, "--host", "host1", "--vlan", "100", "--ip", f"{VM_IP}/24",
                "--memory", "192")
        yield run


def controller_pid(lab: LabRun) -> int:
    return int(json.loads((lab_dir(lab) / "lab.json").read_text())["pids"]["controller"])


def qemu_hosts(lab: LabRun) -> list[str]:
    """Hosts on which a QEMU process of the VM is alive."""
    hosts = []
    for pidfile in (lab_dir(lab) / "hosts").glob(f"*/guests/{VM}.pid"):
        pid = privileged.read_pidfile(pidfile)
        if pid and privileged.pid_alive(pid):
            hosts.append(pidfile.parent.parent.name)
    return sorted(hosts)


@pytest.mark.parametrize("phase", PHASES, ids=[p.value for p in PHASES])
def test_controller_killed_during_phase(lab: LabRun, phase: Phase) -> None:
    vm = lab.json("vm", "show", VM)
    source = vm["host"]
    destination = "host3" if source == "host1" else "host1"
    point = f"hold-after:{phase.value}"
    kill_controller(lab)
    restart_controller(lab, point)
    since = controller_log(lab).stat().st_size
    started = json.loads(lab.cli("migrate", VM, "--to", destination, "--detach",
                                 "--json").stdout)
    # Polled over HTTP (faultkit.api): through the CLI each look cost a Python start.
    wait_failpoint(lab, started["id"], point, since)
    kill_controller(lab)
    restart_controller(lab, None)
    record = wait_end(lab, started["id"], timeout=120)
    expected = {"completed"} if past_point_of_no_return(phase) or phase is Phase.PRECOPY \
        else {"rolled-back"}
    assert record["state"] in expected, record
    where = lab.json("vm", "show", VM)["host"]
    assert where == (destination if record["state"] == "completed" else source)
    assert qemu_hosts(lab) == [where], "the VM must run on exactly one host"
    assert lab.wait_ping("client-100", VM_IP, timeout=30)
    assert lab.cli("audit", check=False).returncode == 0, lab.cli("audit", check=False).stdout


LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


@pytest.mark.parametrize("clock", ["same", "2h-ahead"])
def test_second_controller_on_the_same_store_refuses_to_lead(lab: LabRun, clock: str) -> None:
    """Also with its clock two hours ahead (libfaketime): SQLite's "now" is then the second
    controller's own clock, by which the first's lease ran out long ago."""
    database = lab_dir(lab) / "controller.db"
    env = lab.env if clock == "same" else {**lab.env, "LD_PRELOAD": LIBFAKETIME,
                                           "FAKETIME": "+2h"}
    result = subprocess.run([*VMFERRY, "controller", "serve", "--db", f"sqlite:///{database}",
                             "--listen", f"127.0.0.1:{free_port()}"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "another controller" in result.stderr and "leads this store" in result.stderr
    assert "Traceback" not in result.stderr
    # The leader is untouched and still serves.
    assert lab.json("vm", "show", VM)["state"] == "running"
