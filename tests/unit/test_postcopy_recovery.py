"""Postcopy recovery: the fake hypervisor pauses and re-links a postcopy as QEMU does
(``migrate-pause``, ``migrate-recover``, ``migrate`` with resume), and the engine re-links
a paused postcopy once its link is back -- or holds it, never deleting either end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from enginekit import Site, site_at

from vmferry.controller import recovery
from vmferry.drivers.hypervisor.base import GuestSpec, GuestState, MigrationTuning
from vmferry.drivers.hypervisor.fake import FakeHypervisor, FakeNetwork
from vmferry.errors import HypervisorError

SPEC = GuestSpec(name="web1", memory_mib=256, mac="52:54:00:ab:cd:01", tap="vft-web1",
                 ip_cidr="192.0.2.10/24")
URI = "tcp:198.51.100.2:49152"
AGAIN = "tcp:198.51.100.2:49153"
WAIT_S = 20


def postcopy_pair() -> tuple[FakeNetwork, FakeHypervisor, FakeHypervisor]:
    network = FakeNetwork()
    src = FakeHypervisor("h1", network=network, auto_step=False)
    dst = FakeHypervisor("h2", network=network, auto_step=False)
    src.start(SPEC)
    dst.start(SPEC, incoming_uri=URI, tuning=MigrationTuning(postcopy=True))
    src.migrate(SPEC.name, URI, MigrationTuning(postcopy=True))
    src.step(SPEC.name)
    src.start_postcopy(SPEC.name)
    return network, src, dst


def statuses(src: FakeHypervisor, dst: FakeHypervisor) -> tuple[str, str]:
    return (src.migration_progress(SPEC.name).status,
            dst.migration_progress(SPEC.name).status)


def test_fake_migrate_pause_pauses_both_ends_and_needs_postcopy_active() -> None:
    _, src, dst = postcopy_pair()
    assert statuses(src, dst) == ("postcopy-active", "postcopy-active")
    src.pause_migration(SPEC.name)
    assert statuses(src, dst) == ("postcopy-paused", "postcopy-paused")
    with pytest.raises(HypervisorError) as info:
        src.pause_migration(SPEC.name)
    assert "postcopy-active" in str(info.value.fields["cause"])
    # Both halves stay: the destination runs, the source holds the pages it has.
    assert dst.state(SPEC.name) is GuestState.RUNNING
    assert src.state(SPEC.name) is GuestState.PAUSED


def test_fake_recovery_resumes_to_the_new_listener_and_completes() -> None:
    network, src, dst = postcopy_pair()
    network.cut("198.51.100.2")
    src.step(SPEC.name)
    assert statuses(src, dst) == ("postcopy-paused", "postcopy-paused")
    dst.recover_incoming(SPEC.name, AGAIN)
    src.resume_migration(SPEC.name, AGAIN)       # the link is still down: paused again
    assert statuses(src, dst) == ("postcopy-paused", "postcopy-paused")
    assert src.migration_progress(SPEC.name).error == "Connection refused"
    network.restore("198.51.100.2")
    src.resume_migration(SPEC.name, AGAIN)
    assert statuses(src, dst) == ("postcopy-active", "postcopy-active")
    assert src.step(SPEC.name) == "completed"
    assert dst.state(SPEC.name) is GuestState.RUNNING
    assert src.state(SPEC.name) is GuestState.POSTMIGRATE
    kinds = [e.status for e in src.events(SPEC.name) if e.kind == "MIGRATION"]
    assert kinds[-6:] == ["postcopy-recover-setup", "postcopy-paused", "postcopy-recover-setup",
                          "postcopy-recover", "postcopy-active", "completed"]


def test_fake_recover_incoming_needs_a_paused_postcopy() -> None:
    _, _, dst = postcopy_pair()
    with pytest.raises(HypervisorError) as info:
        dst.recover_incoming(SPEC.name, AGAIN)
    assert "paused" in str(info.value.fields["cause"])


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from site_at(tmp_path)


def paused_postcopy(site: Site) -> int:
    """A postcopy of vm1 from host1 to host3 whose link to host3 is cut: it pauses."""
    site.create_vm()
    hv = site.hypervisors["host1"]
    hv.script_migration("vm1", ["setup", "active"], converge=False)
    site.hold("host1", "vm1", "postcopy-active")
    record = site.migrate(postcopy="auto", postcopy_after_s=0.2, make_before_break=False)
    site.wait_status("host1", "vm1", "postcopy-active")
    site.network.cut("127.0.0.3")                # host3's migration address
    hv.step("vm1")
    assert site.status("host1", "vm1") == "postcopy-paused"
    return record.id


def test_paused_postcopy_is_relinked_when_the_link_is_back(site: Site) -> None:
    migration_id = paused_postcopy(site)
    site.wait_status("host3", "vm1", "postcopy-paused")
    # Held paused while the link is down: both ends kept, nothing deleted.
    assert site.migrations.get(migration_id).state == "running"
    assert site.hypervisors["host3"].state("vm1") is GuestState.RUNNING
    assert site.hypervisors["host1"].state("vm1") is GuestState.PAUSED
    site.network.restore("127.0.0.3")
    site.release("host1", "vm1")
    record = site.migrations.wait(migration_id, WAIT_S)
    assert record.state == "completed", record.error
    assert record.result.model_dump()["postcopy_relinks"] >= 1
    assert site.hypervisors["host3"].state("vm1") is GuestState.RUNNING
    assert site.hypervisors["host1"].state("vm1") is GuestState.ABSENT


def test_paused_postcopy_whose_link_stays_down_is_held_never_deleted(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "RECOVER_WAIT_S", 1.0)
    migration_id = paused_postcopy(site)
    record = site.migrations.wait(migration_id, WAIT_S)
    assert record.state == "failed"
    assert record.error is not None and "needs-operator" in record.error
    assert "postcopy-paused" in record.error and "re-linked" in record.error
    # Both halves of the guest are kept: the destination runs, the source holds pages.
    assert site.hypervisors["host3"].state("vm1") is GuestState.RUNNING
    assert site.hypervisors["host1"].state("vm1") is GuestState.PAUSED
    assert site.status("host1", "vm1") == "postcopy-paused"
