"""One dead host on the in-memory site: `fabric show` and the fabric reconcile are bounded and
name the dead host's ends; a fenced host's VM list lives in the store, so a controller that
dies at any point after the fence still restarts those VMs elsewhere and cleans the host."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from enginekit import Site, beat, site_at

from vmferry.api.agent_client import AgentClient
from vmferry.api.controller import VmCreate
from vmferry.controller import service
from vmferry.controller.hostwatch import FENCE_AFTER_S, SUSPECT_AFTER_S, HostWatch
from vmferry.controller.service import Controller
from vmferry.errors import HostUnavailableError
from vmferry.store.schema import HostRow, VmRow

HUNG_READ_S = 0.3


class SiteFence:
    """Cuts the host off the in-memory site (its agent becomes unreachable)."""

    def __init__(self, site: Site) -> None:
        self.site = site

    def fence(self, host: str) -> None:
        self.site.unreachable.add(host)


class ControllerDies(Exception):
    """Stands for the controller process ending at this point."""


class DiesAfterFencing(HostWatch):
    """A watch whose controller dies right after it recorded the host fenced."""

    def _restart_remaining(self, host: str) -> None:
        raise ControllerDies(host)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    for s in site_at(tmp_path):
        beat(s)
        yield s


@pytest.fixture
def hung_socket(tmp_path: Path) -> Iterator[Path]:
    """A unix socket that takes connections and never answers: a hung agent."""
    path = tmp_path / "hung.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(16)
        yield path


def restart_controller(site: Site) -> None:
    """The site's controller replaced by a new one on the same store (nothing in memory)."""
    old = site.controller
    site.controller, site.migrations = site.new_controller()
    old.close()


def host_row(site: Site, host: str) -> tuple[str | None, list[str]]:
    with site.store.session() as session:
        row = session.get(HostRow, host)
        assert row is not None
        return row.failure_state, sorted(row.fenced_vms)


def create(site: Site, name: str, host: str, ip: str, tier: int = 0) -> None:
    site.controller.create_vm(VmCreate.model_validate(
        {"name": name, "host": host, "vlan": 100, "ip": f"{ip}/24", "memory_mib": 256,
         "policy": {"tier": tier}}), site.actor())


def fence(site: Site, watch: HostWatch, host: str) -> None:
    beat(site, silent=host, age=SUSPECT_AFTER_S + 1)
    watch.check()
    beat(site, silent=host, age=FENCE_AFTER_S + 1)
    watch.check()


def end_of(controller: Controller, host: str) -> tuple[bool, str | None]:
    trunk = next(t for t in controller.fabric_state() if host in (t.a, t.b))
    return (trunk.a_reachable, trunk.a_reason) if trunk.a == host else \
        (trunk.b_reachable, trunk.b_reason)


# ---- the fabric while a host is dead ------------------------------------------------------

def test_a_hung_agent_answers_nothing_within_the_timeout(hung_socket: Path) -> None:
    with AgentClient("host9", f"unix:{hung_socket}", None) as client, \
            pytest.raises(HostUnavailableError) as info:
        client.uplink_vlans(timeout=HUNG_READ_S)
    assert info.value.fields["host"] == "host9"


def test_a_hung_host_delays_neither_fabric_show_nor_a_create_elsewhere(
        site: Site, hung_socket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "FABRIC_READ_TIMEOUT_S", HUNG_READ_S)

    def transport(host: str) -> httpx.BaseTransport:
        return httpx.HTTPTransport(uds=str(hung_socket)) if host == "host4" else \
            site.transport(host)

    controller = Controller(site.store, agent_transport=transport, fabric=site.fabric)
    try:
        controller.create_vm(VmCreate(name="vm1", host="host3", vlan=100,
                                      ip="192.0.2.10/24", memory_mib=256), site.actor())
        assert "host4:uplink" in controller.fabric_drift
        reachable, reason = end_of(controller, "host4")
        assert not reachable and reason is not None
        assert "softswitch of host4 unreachable" in reason and "timed out" in reason
        assert end_of(controller, "host3") == (True, None)
    finally:
        controller.close()


def test_a_suspected_host_is_asked_and_its_ends_say_why_they_are_unknown(site: Site) -> None:
    watch = HostWatch(site.controller, None)
    site.unreachable.add("host4")
    beat(site, silent="host4", age=SUSPECT_AFTER_S + 1)
    watch.check()
    reachable, reason = end_of(site.controller, "host4")
    assert not reachable and reason is not None
    assert "does not answer" in reason and "host host4 is suspected" in reason


def test_a_fenced_host_is_not_asked_and_its_ends_are_pending(site: Site) -> None:
    create(site, "v0", "host4", "192.0.2.20")
    watch = HostWatch(site.controller, SiteFence(site))
    fence(site, watch, "host4")
    assert host_row(site, "host4")[0] == "fenced"
    assert site.controller.fabric_drift["host4:uplink"].startswith(
        "pending: host host4 is fenced")
    reachable, reason = end_of(site.controller, "host4")
    assert not reachable and reason is not None and reason.endswith("not asked")
    create(site, "v1", "host3", "192.0.2.21")           # host4's rack still takes VMs
    vms = {v.name: v for v in site.controller.vms()}
    assert vms["v1"].state == "running" and vms["v0"].host != "host4"


# ---- the fenced host's VMs survive a controller restart -------------------------------------

def test_what_a_fenced_host_ran_is_kept_until_it_is_cleaned(site: Site) -> None:
    create(site, "v0", "host1", "192.0.2.20")
    create(site, "v1", "host1", "192.0.2.21")
    watch = HostWatch(site.controller, SiteFence(site))
    fence(site, watch, "host1")
    assert host_row(site, "host1") == ("fenced", ["v0", "v1"])
    restart_controller(site)       # another controller (the first died) sees it return
    watch = HostWatch(site.controller, SiteFence(site))
    site.unreachable.discard("host1")
    beat(site)
    watch.check()
    assert host_row(site, "host1") == (None, [])
    assert site.hypervisors["host1"].guests() == []


def test_a_controller_dead_after_the_fence_leaves_the_restarts_to_the_next(
        site: Site) -> None:
    create(site, "v0", "host1", "192.0.2.20", tier=2)
    create(site, "v1", "host1", "192.0.2.21", tier=0)
    with pytest.raises(ControllerDies):
        fence(site, DiesAfterFencing(site.controller, SiteFence(site)), "host1")
    assert host_row(site, "host1") == ("fenced", ["v0", "v1"])
    assert {v.host for v in site.controller.vms()} == {"host1"}
    restart_controller(site)
    watch = HostWatch(site.controller, SiteFence(site))
    watch.check()                                   # host1 still silent, still fenced
    vms = {v.name: v for v in site.controller.vms()}
    assert all(v.host != "host1" and v.state == "running" for v in vms.values()), vms
    for name, vm in vms.items():
        assert site.hypervisors[vm.host].state(name).value == "running"


def test_a_restart_cut_short_by_the_controller_dying_is_finished(site: Site) -> None:
    create(site, "v0", "host1", "192.0.2.20")
    with pytest.raises(ControllerDies):
        fence(site, DiesAfterFencing(site.controller, SiteFence(site)), "host1")
    with site.store.session() as session:          # where the restart got to: moved, no QEMU
        row = session.get(VmRow, "v0")
        assert row is not None
        row.host, row.state = "host2", "creating"
    assert "v0" not in site.hypervisors["host2"].guests()
    restart_controller(site)
    HostWatch(site.controller, SiteFence(site)).check()
    vm = next(v for v in site.controller.vms() if v.name == "v0")
    assert (vm.host, vm.state) == ("host2", "running")
    assert site.hypervisors["host2"].state("v0").value == "running"


def test_a_started_watch_does_not_count_the_controllers_own_downtime_as_silence(
        site: Site) -> None:
    beat(site, silent="host2", age=FENCE_AFTER_S + 1)   # its last beat before we went down
    fence = SiteFence(site)
    watch = HostWatch(site.controller, fence)
    watch.start()                                       # the controller starts again
    watch.stop()                                        # (its own passes: none)
    watch.check()
    watch.check()
    assert host_row(site, "host2")[0] is None and "host2" not in site.unreachable
