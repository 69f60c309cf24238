"""Placement through the controller on the in-memory site (enginekit): policies stored and
enforced at create, where, the precheck's refusal, drains and balancing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from enginekit import Site, beat, site_at

from vmferry.agent.cpuload import CpuLoad
from vmferry.api.controller import VmCreate
from vmferry.controller import placement as placement_controller
from vmferry.controller.drain import Mover
from vmferry.controller.migration import holds_slot
from vmferry.controller.phases import STEPS
from vmferry.controller.placement import Placement
from vmferry.controller.run import Run
from vmferry.errors import ConflictError, InputError, NotFoundError
from vmferry.model.migration import Phase
from vmferry.model.placement import VmPolicy
from vmferry.model.topology import Topology

# A bound for a hung drain only (it takes about 5 s; the unit suite under load several times
# that): the drain ends by itself, the test waits on its thread.
DRAIN_WAIT_S = 300.0


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    # One beat keeps every host up for the whole test, however slow the machine: a drain
    # once found every host "down" when a loaded machine took over 10 s (HEARTBEAT_FRESH)
    # from the fixture's beat to the plan. Staleness is tested in test_placement_hostwatch.
    monkeypatch.setattr(placement_controller, "HEARTBEAT_FRESH", timedelta(days=1))
    for s in site_at(tmp_path):
        data = s.topology.model_dump(mode="json")
        data["hosts"][3]["zone"] = "secure"          # host4
        s.topology = Topology.model_validate(data)
        s.controller.set_inventory(s.topology, s.actor())
        beat(s)
        yield s


def create(site: Site, name: str, host: str, ip: str, **policy: Any) -> None:
    site.controller.create_vm(VmCreate.model_validate(
        {"name": name, "host": host, "vlan": 100, "ip": f"192.0.2.{ip}/24", "memory_mib": 256,
         "policy": VmPolicy(**policy)}), site.actor())


def reasons(site: Site, vm: str) -> dict[str, list[str]]:
    out = Placement(site.controller).where(vm)
    return {h.host: [r.code for r in h.reasons] for h in out.hosts}


def test_policy_enforced_at_create_and_where_lists_reasons(site: Site) -> None:
    create(site, "a", "host1", "11", anti_affinity=["g"], forbidden_hosts=["host3"])
    with pytest.raises(ConflictError) as info:
        create(site, "b", "host1", "12", anti_affinity=["g"])
    assert "anti_affinity" in info.value.message
    with pytest.raises(ConflictError, match="zone"):
        create(site, "c", "host4", "13")
    with pytest.raises(NotFoundError, match=r"policy\.forbidden_hosts"):
        create(site, "d", "host2", "14", forbidden_hosts=["nohost"])
    assert [v.name for v in site.controller.vms()] == ["a"]
    assert reasons(site, "a") == {"host1": ["current"], "host2": [], "host3": ["forbidden"],
                                  "host4": ["zone"]}
    assert site.controller.vm("a").policy == VmPolicy(anti_affinity=["g"],
                                                     forbidden_hosts=["host3"])


def test_migrate_to_refused_host_fails_with_where_reason_and_changes_nothing(site: Site
                                                                              ) -> None:
    create(site, "a", "host1", "11", forbidden_hosts=["host3"])
    record = site.migrations.wait(site.migrate("a", to="host3").id, 30)
    assert record.state == "rolled-back"
    assert record.error is not None and "forbidden: host3 is among a's forbidden hosts" \
        in record.error
    assert site.controller.vm("a").host == "host1"
    assert site.controller.vm("a").state == "running"


def test_policy_changed_live_and_bad_policy_refused(site: Site) -> None:
    create(site, "a", "host1", "11")
    placement = Placement(site.controller)
    with pytest.raises(InputError, match=r"policy\.tier"):
        placement.set_policy("a", {"tier": 42}, site.actor())
    assert placement.policy("a") == VmPolicy()
    placement.set_policy("a", {"allowed_hosts": ["host1", "host2"]}, site.actor())
    assert reasons(site, "a")["host3"] == ["allowed"]


def test_drain_moves_every_vm_honouring_anti_affinity(site: Site) -> None:
    create(site, "a", "host1", "11", anti_affinity=["g"])
    create(site, "b", "host1", "12")
    create(site, "c", "host1", "13")
    create(site, "d", "host2", "14", anti_affinity=["g"])
    mover = Mover(site.migrations)
    job = mover.drain("host1", site.actor())
    assert len(job.moves) == 3
    job = mover.wait("host1", DRAIN_WAIT_S)
    assert job.state == "done", job
    hosts = {v.name: v.host for v in site.controller.vms()}
    assert "host1" not in hosts.values()
    assert hosts["a"] != hosts["d"]
    assert "host4" not in hosts.values()
    assert reasons(site, "d")["host1"] == ["state"]        # in maintenance
    mover.undrain("host1", site.actor())
    assert reasons(site, "d")["host1"] == []


def test_drain_refused_up_front_when_a_vm_has_nowhere_to_go(site: Site) -> None:
    create(site, "a", "host1", "11", allowed_hosts=["host1"])
    with pytest.raises(ConflictError) as info:
        Mover(site.migrations).drain("host1", site.actor())
    assert "a has nowhere to go" in info.value.message
    stuck = info.value.fields["stuck"]["a"]
    assert {h["host"]: [r["code"] for r in h["reasons"]] for h in stuck}["host2"] == ["allowed"]
    assert not any(h.maintenance for h in site.controller.hosts())


def test_balance_dry_run_plans_within_the_bound(site: Site) -> None:
    for i in range(4):
        create(site, f"v{i}", "host1", str(20 + i))
    out = Mover(site.migrations).balance(2, True, site.actor())
    assert len(out.moves) == 2 and out.state == "planned"
    assert out.load_before["host1"] == 0.5 and out.load_after["host1"] == 0.25
    assert {v.host for v in site.controller.vms()} == {"host1"}


def test_balance_reads_cpu_from_the_agents_and_moves_the_busy_vm(site: Site) -> None:
    clock = [0.0]
    for name, agent in site.agents.items():
        agent.cpu_load = CpuLoad(site.hypervisors[name], clock=lambda: clock[0])
    for i, vm in enumerate(("busy", "idle", "other")):
        create(site, vm, "host1" if vm != "other" else "host2", str(30 + i))
    beat(site)                                    # first readings: no load yet
    site.hypervisors["host1"].burn("busy", 3.0)
    clock[0] += 2.0
    beat(site)
    assert site.controller.host_report("host1").guests[0].cpu_load == 1.5
    out = Mover(site.migrations).balance(1, True, site.actor())
    assert [(m.vm, m.source) for m in out.moves] == [("busy", "host1")]
    assert out.cpu_before["host1"] > out.cpu_after["host1"]
    assert out.memory_before["host1"] > out.memory_after["host1"]
    assert {v.host for v in site.controller.vms() if v.name == "busy"} == {"host1"}


def test_a_migration_holds_its_hosts_slots_until_switchover() -> None:
    assert holds_slot("running", Phase.PRECOPY.value)
    assert holds_slot("running", Phase.SWITCHOVER.value)
    assert not holds_slot("running", Phase.ANNOUNCE.value)
    assert not holds_slot("running", Phase.VERIFY.value)
    assert holds_slot("rolling-back", Phase.PRECOPY.value)
    assert holds_slot("rolling-back", Phase.ANNOUNCE.value)
    assert not holds_slot("completed", Phase.PRECOPY.value)


def test_a_host_slot_frees_at_switchover_and_the_drain_takes_it(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """host1 copies two at a time (its limit): the third move starts while the first two
    still verify, and the store lists all three as running meanwhile."""
    verifying = threading.Event()
    go_on = threading.Event()
    real_verify = STEPS[Phase.VERIFY]

    def held_verify(run: Run) -> None:
        verifying.set()
        if not go_on.wait(DRAIN_WAIT_S):
            raise AssertionError("verify was never let go")
        real_verify(run)
    monkeypatch.setitem(STEPS, Phase.VERIFY, held_verify)
    for i, name in enumerate(("a", "b", "c")):
        create(site, name, "host1", str(40 + i))
    mover = Mover(site.migrations)
    mover.drain("host1", site.actor())
    try:
        assert verifying.wait(DRAIN_WAIT_S)
        # Every move reaches verify while none has ended: the third took a freed slot.
        deadline_ok = _until(lambda: sum(1 for r in site.migrations.recent()
                                          if r.phase == "verify") == 3)
        assert deadline_ok, [(r.vm, r.phase, r.state) for r in site.migrations.recent()]
        assert {r.state for r in site.migrations.recent()} == {"running"}
    finally:
        go_on.set()
    job = mover.wait("host1", DRAIN_WAIT_S)
    assert job.state == "done", job
    assert {v.host for v in site.controller.vms()} & {"host1"} == set()


def test_a_third_migration_from_a_host_is_refused_until_one_switched_over(
        site: Site) -> None:
    for i, name in enumerate(("a", "b", "c")):
        create(site, name, "host1", str(50 + i))
    site.hold("host1", "a")
    site.hold("host1", "b")
    first = site.migrate("a", to="host2")
    site.migrate("b", to="host3")
    site.wait_status("host1", "a", "active")
    with pytest.raises(ConflictError, match="not yet switched over"):
        site.migrate("c", to="host2")
    site.release("host1", "a")
    assert site.migrations.wait(first.id, DRAIN_WAIT_S).state == "completed"
    third = site.migrate("c", to="host2")
    site.release("host1", "b")
    assert site.migrations.wait(third.id, DRAIN_WAIT_S).state == "completed"


def _until(check: Callable[[], bool], timeout: float = DRAIN_WAIT_S) -> bool:
    """``check`` came true within ``timeout`` s (a bound for a hang, not a speed test)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
