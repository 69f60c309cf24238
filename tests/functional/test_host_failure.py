"""Issue 14: a host dies (agent, QEMUs, links); the controller suspects it, fences it, and
restarts its VMs elsewhere by tier, reachable on their VLAN, never two copies; when the host
returns it is cleaned before it takes VMs again, also by a controller restarted meanwhile.
Issue 11: while the host is dead the rest of the site works (a VM is created and migrated
across the dead host's rack) and `fabric show` reports the dead host's ends unreachable."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

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

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(900)]

VMS = {"crit": ("192.0.2.21", "0"), "bulk": ("192.0.2.22", "5")}
# The bound we state: a dead host's VMs run elsewhere within 90 s. Heartbeats every 2 s;
# suspected after 6 s, fenced after 12 s (controller/hostwatch.py), then the restarts one
# after another by tier, each a guest boot of a few seconds under TCG (measured: 30-47 s for
# two VMs on a loaded 2-core machine). The test waits up to this long for the restarts.
RESTART_BOUND_S = 90
# Bounds on single operations while host3 is dead: `fabric show` reads every trunk end in
# parallel, each read bounded (10 s, controller/service.py); a create or a migration is not
# held up by the dead host's ends (they are not on its path, and a fenced host's are skipped).
FABRIC_SHOW_BOUND_S = 60
OPERATION_BOUND_S = 240
OTHER = ("other", "192.0.2.23")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    os.environ["VMFERRY_HOSTWATCH"] = "1"        # the lab's controller inherits it
    try:
        with running_lab(tmp_path_factory.mktemp("state"), default_topology("thf")) as run:
            yield run
    finally:
        os.environ.pop("VMFERRY_HOSTWATCH", None)


def live_copies(lab: LabRun, vm: str) -> list[str]:
    """Hosts where a QEMU of ``vm`` runs (by its pidfile)."""
    hosts = lab.state_dir / "labs" / lab.name / "hosts"
    found = []
    for pidfile in hosts.glob(f"*/guests/{vm}.pid"):
        pid = privileged.read_pidfile(pidfile)
        if pid and privileged.pid_alive(pid):
            found.append(pidfile.parent.parent.name)
    return found


def kill_host(lab: LabRun, host: str, spare: str) -> None:
    """What a dead host looks like: no agent, no links, its QEMUs killed, except ``spare``'s,
    left running as on a hung host: the controller's fence must end it before that VM runs
    elsewhere (or there would be two copies)."""
    state = json.loads((lab.state_dir / "labs" / lab.name / "lab.json").read_text())
    privileged.stop_pid(int(state["pids"][f"agent-{host}"]))
    for pidfile in (lab.state_dir / "labs" / lab.name / "hosts" / host / "guests").glob("*.pid"):
        pid = privileged.read_pidfile(pidfile)
        if pidfile.stem != spare and pid and privileged.pid_alive(pid):
            privileged.stop_pid(pid)
    for ifname in ("uplink", "mig0"):
        privileged.set_link_up(lab.namespace(host), ifname, False)


def test_dead_host_is_fenced_and_its_vms_restart_elsewhere(lab: LabRun) -> None:
    for vm, (ip, tier) in VMS.items():
        lab.cli("vm", "create", vm, "--host", "host3", "--vlan", "100", "--ip", f"{ip}/24",
                "--memory", "192")
        lab.cli("vm", "policy", vm, "--tier", tier)
        assert lab.wait_ping("client-100", ip)
    macs = {v["name"]: v["mac"] for v in lab.json("vm", "list")}
    assert live_copies(lab, "crit") == ["host3"]
    killed = time.monotonic()
    kill_host(lab, "host3", spare="crit")
    dead_ends_are_reported(lab)       # dead but not fenced yet (that takes 12 s)
    moved: dict[str, str] = {}
    while time.monotonic() - killed < RESTART_BOUND_S and len(moved) < len(VMS):
        moved = {v["name"]: v["host"] for v in lab.json("vm", "list")
                 if v["host"] != "host3" and v["state"] == "running"}
        for vm in VMS:                  # never two copies, at any moment we look
            assert len(live_copies(lab, vm)) <= 1, (vm, live_copies(lab, vm))
        time.sleep(0.5)
    assert set(moved) == set(VMS), lab.cli("events", "--limit", "1000").stdout[-3000:]
    for vm, (ip, _) in VMS.items():
        assert lab.wait_ping("client-100", ip, timeout=60), vm
        assert live_copies(lab, vm) == [moved[vm]]
    print(f"\nVMs of host3 restarted and answering {time.monotonic() - killed:.1f} s "
          f"after the host died")
    # Events come oldest first: restarts by tier, crit (tier 0) before bulk (tier 5).
    restarted = [e for e in lab.json("events", "--limit", "1000")
                 if e["action"] == "vm.restart"]
    assert [e["target"] for e in restarted if e["outcome"] == "ok"] == ["crit", "bulk"]
    assert {v["name"]: v["mac"] for v in lab.json("vm", "list")} == macs
    where = {h["host"]: h for h in lab.json("where", "crit")["hosts"]}
    assert where["host3"]["state"] == "fenced"


def dead_ends_are_reported(lab: LabRun) -> None:
    """`fabric show` (CLI and GET API) answers, every end of host3 unreachable with a reason
    naming host3, every other end read."""
    token = (lab_dir(lab) / "secrets" / "admin.token").read_text().strip()
    with httpx.Client(base_url=f"http://127.0.0.1:{lab.port}", timeout=FABRIC_SHOW_BOUND_S,
                      headers={"Authorization": f"Bearer {token}"}) as api:
        answer = api.get("/v1/fabric")
    assert answer.status_code == 200, answer.text
    cli = json.loads(lab.cli("fabric", "show", "--json", timeout=FABRIC_SHOW_BOUND_S).stdout)
    for trunks in (answer.json(), cli):
        dead = 0
        for t in trunks:
            for side in ("a", "b"):
                if t[side] == "host3":
                    dead += 1
                    assert not t[f"{side}_reachable"] and t[f"actual_{side}"] is None, t
                    assert "host3" in t[f"{side}_reason"] and \
                        "unreachable" in t[f"{side}_reason"], t
                    assert not t["in_sync"]
                else:
                    assert t[f"{side}_reachable"], t
        assert dead == 1, trunks


def test_while_a_host_is_fenced_the_rest_of_the_site_works(lab: LabRun) -> None:
    assert {h["host"]: h for h in lab.json("where", "crit")["hosts"]}["host3"]["state"] == \
        "fenced"
    dead_ends_are_reported(lab)
    name, ip = OTHER
    lab.cli("vm", "create", name, "--host", "host1", "--vlan", "100", "--ip", f"{ip}/24",
            "--memory", "192", timeout=OPERATION_BOUND_S)
    assert lab.wait_ping("client-100", ip)
    # To host4: across to host3's rack, through tor2, whose trunk to host3 is dead.
    result = lab.cli("migrate", name, "--to", "host4", "--json", "--timeout",
                     str(OPERATION_BOUND_S), check=False, timeout=OPERATION_BOUND_S + 60)
    assert result.stdout, result.stderr
    record = json.loads(result.stdout)
    assert record["state"] == "completed", record
    assert lab.wait_ping("client-100", ip)
    assert live_copies(lab, name) == ["host4"]
    # The audit finds only what the dead host makes unknowable, each finding naming it.
    audit = lab.cli("audit", "--json", check=False)
    findings = json.loads(audit.stdout)
    assert findings and all(f["where"].split(":")[0] == "host3" for f in findings), findings


def test_returning_host_is_cleaned_before_it_takes_vms(lab: LabRun) -> None:
    # The controller dies while host3 is fenced: what host3 ran is in the store, so the new
    # controller still cleans it. `lab up` restarts the controller, host3's agent and links.
    kill_controller(lab)
    restart_controller(lab)
    deadline = time.monotonic() + 60
    state = ""
    while time.monotonic() < deadline:
        state = {h["host"]: h for h in lab.json("where", "crit")["hosts"]}["host3"]["state"]
        if state == "up":
            break
        time.sleep(1)
    assert state == "up"
    guests = lab.state_dir / "labs" / lab.name / "hosts" / "host3" / "guests"
    assert [p.name for p in guests.glob("*") if p.name.split(".")[0] in VMS] == []
    for vm in VMS:
        assert lab.exec("host3", "ip", "link", "show", f"vm-{vm}").returncode != 0
    assert all(t["in_sync"] for t in lab.json("fabric", "show"))
    assert lab.cli("audit", check=False).returncode == 0
    cleaned = [e for e in lab.json("events", "--limit", "1000") if e["action"] == "host.state"
               and e["target"] == "host3" and e["outcome"] == "up"]
    assert cleaned and set(cleaned[-1]["detail"].get("cleaned", [])) >= set(VMS)
    assert live_copies(lab, OTHER[0]) == ["host4"]
