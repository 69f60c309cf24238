"""Host failure on the in-memory site: suspected, fenced, VMs restarted elsewhere by tier
with the same MAC and address, never before the fence; the returning host is cleaned."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from enginekit import Site, beat, site_at

from vmferry.api.controller import VmCreate
from vmferry.controller.hostwatch import FENCE_AFTER_S, SUSPECT_AFTER_S, HostWatch
from vmferry.errors import PrivilegedError, VmferryError
from vmferry.model.placement import VmPolicy
from vmferry.store.schema import EventRow, HostRow


class SiteFence:
    """Cuts the host off the in-memory site (its agent becomes unreachable)."""

    def __init__(self, site: Site, works: bool = True) -> None:
        self.site, self.works = site, works
        self.fenced: list[str] = []

    def fence(self, host: str) -> None:
        if not self.works:
            raise PrivilegedError(f"cannot fence {host}", host=host)
        self.site.unreachable.add(host)
        self.fenced.append(host)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    for s in site_at(tmp_path):
        beat(s)
        yield s


def failure_state(site: Site, host: str) -> str | None:
    with site.store.session() as session:
        row = session.get(HostRow, host)
        assert row is not None
        return row.failure_state


def test_failed_host_is_fenced_then_its_vms_restart_elsewhere_by_tier(site: Site) -> None:
    for i, tier in enumerate((3, 0, 1)):
        site.controller.create_vm(VmCreate.model_validate(
            {"name": f"v{i}", "host": "host1", "vlan": 100, "ip": f"192.0.2.{20 + i}/24",
             "memory_mib": 256, "policy": VmPolicy(tier=tier)}), site.actor())
    macs = {v.name: v.mac for v in site.controller.vms()}
    fence = SiteFence(site, works=False)
    watch = HostWatch(site.controller, fence)
    beat(site, silent="host1", age=SUSPECT_AFTER_S + 1)
    watch.check()
    assert failure_state(site, "host1") == "suspected"
    beat(site, silent="host1", age=FENCE_AFTER_S + 1)
    watch.check()                                  # the fence fails: nothing restarts
    assert failure_state(site, "host1") == "suspected"
    assert {v.host for v in site.controller.vms()} == {"host1"}

    fence.works = True
    watch.check()
    assert fence.fenced == ["host1"] and failure_state(site, "host1") == "fenced"
    vms = {v.name: v for v in site.controller.vms()}
    assert all(v.host != "host1" and v.state == "running" for v in vms.values())
    assert {n: v.mac for n, v in vms.items()} == macs
    for name, vm in vms.items():
        assert site.hypervisors[vm.host].state(name).value == "running"
    with site.store.session() as session:
        order = [e.target for e in session.query(EventRow).filter(
            EventRow.action == "vm.restart").order_by(EventRow.id)]
    assert order == ["v1", "v2", "v0"]             # tier 0, 1, 3

    site.unreachable.discard("host1")              # the host comes back
    assert set(site.hypervisors["host1"].guests()) == {"v0", "v1", "v2"}
    beat(site)
    watch.check()
    assert failure_state(site, "host1") is None
    assert site.hypervisors["host1"].guests() == []
    assert all(t.in_sync for t in site.controller.fabric_state())


def test_suspected_host_that_heartbeats_again_is_up_without_fencing(site: Site) -> None:
    fence = SiteFence(site)
    watch = HostWatch(site.controller, fence)
    beat(site, silent="host2", age=SUSPECT_AFTER_S + 1)
    watch.check()
    assert failure_state(site, "host2") == "suspected"
    beat(site)
    watch.check()
    assert failure_state(site, "host2") is None and fence.fenced == []


def test_a_cleaning_cut_short_is_taken_up_again_before_the_host_takes_vms(site: Site) -> None:
    site.controller.create_vm(VmCreate.model_validate(
        {"name": "v0", "host": "host2", "vlan": 100, "ip": "192.0.2.30/24",
         "memory_mib": 256}), site.actor())
    fence = SiteFence(site)
    watch = HostWatch(site.controller, fence)
    beat(site, silent="host2", age=SUSPECT_AFTER_S + 1)
    watch.check()
    beat(site, silent="host2", age=FENCE_AFTER_S + 1)
    watch.check()
    assert failure_state(site, "host2") == "fenced"
    assert {v.host for v in site.controller.vms()} != {"host2"}
    site.unreachable.discard("host2")
    beat(site)
    site.unreachable.add("host2")                  # it answers heartbeats, not the cleaning
    with pytest.raises(VmferryError):
        watch.check()
    assert failure_state(site, "host2") == "cleaning"
    assert set(site.hypervisors["host2"].guests()) == {"v0"}
    site.unreachable.discard("host2")
    beat(site)
    watch.check()
    assert failure_state(site, "host2") is None
    assert site.hypervisors["host2"].guests() == []
