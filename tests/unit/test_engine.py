"""The migration engine end to end on fake drivers: a real controller on SQLite, real host
agents behind ``AgentClient`` (in-process HTTP), in-memory hypervisors, softswitches and
fabric (``enginekit``). Covers the forward path, every rollback cause, and recovery by a
restarted controller from each phase. No root, seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from enginekit import Site, site_at

from vmferry.api.agent import MigrateRequest
from vmferry.api.controller import MigrationRecord
from vmferry.controller import truth
from vmferry.controller.phases import STEPS
from vmferry.controller.run import Run
from vmferry.drivers.hypervisor.base import GuestState
from vmferry.model.migration import PHASES, MigrationOptions, Phase
from vmferry.model.switchover import is_mbb_cookie
from vmferry.store.schema import HostRow, MigrationRow, VmRow

WAIT_S = 20


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from site_at(tmp_path)


def finish(site: Site, record: MigrationRecord) -> MigrationRecord:
    return site.migrations.wait(record.id, WAIT_S)


def vm_row(site: Site, name: str = "vm1") -> tuple[str, str]:
    with site.store.session() as session:
        row = session.get(VmRow, name)
        assert row is not None
        return row.host, row.state


def no_switchover_rules(site: Site) -> bool:
    fabric = any(is_mbb_cookie(c) for switch in site.fabric.switches.values()
                 for c in switch.rules)
    hosts = any(is_mbb_cookie(f.cookie) for s in site.softswitches.values()
                for f in s.flow_stats("br-vm"))
    pins = any(switch.pinned for switch in site.fabric.switches.values())
    return not fabric and not hosts and not pins


def stays_on_source(site: Site, record: MigrationRecord) -> None:
    """The VM runs on host1 only; nothing of it is left on host3."""
    assert site.hypervisors["host1"].state("vm1") is GuestState.RUNNING
    assert site.hypervisors["host3"].state("vm1") is GuestState.ABSENT
    assert "vm1" not in site.agents["host3"].inventory_of_leftovers().requests
    assert vm_row(site) == ("host1", "running")
    assert no_switchover_rules(site)


# ---- forward --------------------------------------------------------------------------------

def test_completed_move_follows_events_and_records_them(site: Site) -> None:
    site.create_vm()
    record = finish(site, site.migrate(make_before_break=True))
    assert record.state == "completed", record.error
    assert [p.phase for p in record.phases] == [p.value for p in PHASES]
    assert all(p.ok for p in record.phases)
    assert vm_row(site) == ("host3", "running")
    assert site.hypervisors["host3"].state("vm1") is GuestState.RUNNING
    assert site.hypervisors["host1"].state("vm1") is GuestState.ABSENT
    events = record.result.events
    assert events.source_stop is not None and events.source_completed is not None
    assert events.destination_resume is not None
    assert events.source_stop <= events.source_completed <= events.destination_resume
    assert record.result.completed_to_switchover_ms is not None
    assert record.result.controller_cpu_ms is not None
    assert record.result.qemu is not None and record.result.qemu.status == "completed"
    assert record.options.max_downtime_ms == 300      # the default policy, resolved at start
    assert record.result.make_before_break == "removed"
    assert no_switchover_rules(site)
    # The VLAN went to host3's side of the fabric and left host1's.
    assert site.agents["host3"].uplink_vlans() == [100]
    assert site.agents["host1"].uplink_vlans() == []


def test_window_opens_once_the_source_stopped_the_guest(site: Site,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Staged behind the closed gate while the guest runs on the source; opened once it
    stopped (QEMU is not held in pre-switchover for it)."""
    from vmferry.controller import switchover
    from vmferry.model.switchover import is_gate_cookie
    seen: list[tuple[str, list[bool]]] = []
    real_open = switchover.MakeBeforeBreak.open

    def gates() -> list[bool]:
        return [is_gate_cookie(f.cookie) for f in site.softswitches["host3"].flow_stats("br-vm")
                if is_mbb_cookie(f.cookie)]

    def open_(self: switchover.MakeBeforeBreak) -> None:
        seen.append((site.hypervisors["host1"].state("vm1").value, gates()))
        real_open(self)
        seen.append(("opened", gates()))
    monkeypatch.setattr(switchover.MakeBeforeBreak, "open", open_)
    site.create_vm()
    record = finish(site, site.migrate())
    assert record.state == "completed", record.error
    state, gate = seen[0]
    assert state in ("paused", "postmigrate")   # stopped (QEMU goes on without waiting)
    assert gate == [True, True]     # only the closed gate and the guest's own opener on host3
    assert seen[1] == ("opened", [False])       # the delivering rule replaced it
    assert "pre-switchover" not in str(record.result.progress)
    assert record.result.make_before_break == "removed"
    assert no_switchover_rules(site)


def test_postcopy_after_is_one_option_from_api_to_engine(site: Site) -> None:
    options = MigrationOptions.model_validate({"postcopy": "auto", "postcopy_after_s": 7})
    assert options.postcopy_after() == 7
    assert MigrationOptions.model_validate({"timeout_s": 60}).postcopy_after() == 20
    request = MigrateRequest(uri="tcp:127.0.0.1:4444", options=options)
    assert MigrateRequest.model_validate_json(request.model_dump_json()).options == options


# ---- rollback, one test per cause -----------------------------------------------------------

def test_precheck_refusal_changes_nothing(site: Site) -> None:
    site.create_vm()
    with site.store.session() as session:
        row = session.get(HostRow, "host3")
        assert row is not None
        row.maintenance = True
    record = finish(site, site.migrate())
    assert record.state == "rolled-back"
    assert record.error is not None and "maintenance" in record.error
    stays_on_source(site, record)


def held(site: Site, **options: object) -> MigrationRecord:
    """A migration whose QEMU copy stays active until the test acts."""
    site.create_vm()
    site.hold("host1", "vm1")
    record = site.migrate(**options)
    site.wait_status("host1", "vm1", "active")
    return record


def test_destination_qemu_dies_during_precopy(site: Site) -> None:
    record = held(site)
    site.hypervisors["host3"].kill("vm1")
    record = finish(site, record)
    assert record.state == "rolled-back"
    assert record.error is not None and "died" in record.error
    stays_on_source(site, record)


def test_qemu_migration_fails_when_the_link_breaks(site: Site) -> None:
    record = held(site)
    uri = site.migrations.get(record.id).result.incoming_uri
    assert uri is not None
    site.network.break_link(uri)
    site.release("host1", "vm1")
    record = finish(site, record)
    assert record.state == "rolled-back"
    assert record.error is not None and "QEMU migration failed" in record.error
    assert "Connection reset by peer" in record.error
    stays_on_source(site, record)


def test_convergence_timeout(site: Site) -> None:
    record = finish(site, held(site, timeout_s=1))
    assert record.state == "rolled-back"
    assert record.error is not None and "converge" in record.error
    assert site.status("host1", "vm1") == "cancelled"
    stays_on_source(site, record)


def test_operator_cancel(site: Site) -> None:
    record = held(site)
    site.migrations.cancel(record.id, site.actor())
    record = finish(site, record)
    assert record.state == "rolled-back"
    assert record.error is not None and "cancelled by the operator" in record.error
    stays_on_source(site, record)


def test_destination_agent_unreachable(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(truth, "UNREACHABLE_WAIT_S", 1.0)
    record = held(site)
    site.unreachable.add("host3")
    record = finish(site, record)
    # The source is safe; the destination could not be cleaned: an operator must look.
    assert record.state == "failed"
    assert record.error is not None and "needs-operator" in record.error
    assert "host3" in record.error and "does not answer" in record.error
    assert site.hypervisors["host1"].state("vm1") is GuestState.RUNNING
    assert site.status("host1", "vm1") == "cancelled"
    assert vm_row(site) == ("host1", "running")


def test_destination_agent_back_lets_the_rollback_finish(site: Site) -> None:
    record = held(site)
    site.unreachable.add("host3")
    site.wait_status("host1", "vm1", "cancelled")
    deadline = time.monotonic() + WAIT_S  # the engine keeps asking host3 meanwhile
    while site.migrations.get(record.id).state != "rolling-back":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    site.unreachable.discard("host3")     # the agent restarted
    record = finish(site, record)
    assert record.state == "rolled-back", record.error
    stays_on_source(site, record)


def test_timeout_landing_after_qemu_completed_goes_forward(site: Site) -> None:
    record = held(site, timeout_s=1, make_before_break=False)
    hv = site.hypervisors["host1"]
    real_cancel = hv.cancel_migration

    def late_cancel(name: str) -> None:   # QEMU completed before the cancel reached it
        site.release("host1", name)
        hv.run_migration(name)
        real_cancel(name)
    hv.cancel_migration = late_cancel     # type: ignore[method-assign]
    record = finish(site, record)
    assert record.state == "completed", record.error
    assert "converge" in (record.result.model_extra or {})["turned_forward"]
    moved(site)


def test_agent_call_failing_right_after_completion(site: Site) -> None:
    record = held(site, make_before_break=False)
    site.unreachable.add("host3")
    site.release("host1", "vm1")
    site.wait_status("host1", "vm1", "completed")
    time.sleep(0.5)
    site.unreachable.discard("host3")
    record = finish(site, record)
    assert record.state == "completed", record.error
    moved(site)


def test_unexpected_error_in_a_phase_rolls_back(site: Site,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(run: Run) -> None:
        raise KeyError("surprise")
    monkeypatch.setitem(STEPS, Phase.START_DESTINATION, broken)
    site.create_vm()
    record = finish(site, site.migrate())
    assert record.state == "rolled-back", record.error
    assert record.error is not None and "KeyError" in record.error
    stays_on_source(site, record)


def moved(site: Site) -> None:
    assert vm_row(site) == ("host3", "running")
    assert site.hypervisors["host3"].state("vm1") is GuestState.RUNNING
    assert site.hypervisors["host1"].state("vm1") is GuestState.ABSENT


# ---- recovery by a restarted controller -----------------------------------------------------

def die_at(site: Site, phase: Phase, *, copying: bool = False) -> int:
    """Drive a migration in this thread up to ``phase`` (acted, not recorded as ended), as a
    controller that died there would leave it. ``copying``: die in precopy with QEMU still
    copying (else, for precopy, QEMU completed while the controller was gone)."""
    site.create_vm()
    options = MigrationOptions.model_validate({"max_downtime_ms": 300})
    with site.store.session() as session:
        row = MigrationRow(vm="vm1", source="host1", destination="host3", state="running",
                           phase=Phase.PRECHECK.value, options=options.model_dump(mode="json"),
                           phases=[], result={})
        session.add(row)
        session.flush()
        migration_id = row.id
    run = Run(site.controller, migration_id, threading.Event(), lambda record: None)
    for current in PHASES[:PHASES.index(phase) + 1]:
        run.begin(current)
        if current is Phase.PRECOPY and copying:
            site.hold("host1", "vm1")
            run.record_result(migrate_issued=True)
            uri = run.dst.guest("vm1").incoming_uri
            assert uri is not None
            run.src.migrate("vm1", MigrateRequest(uri=uri, options=options))
            site.wait_status("host1", "vm1", "active")
            break
        STEPS[current](run)
        if current is not phase:
            run.end(current, ok=True)
    return migration_id


@pytest.mark.parametrize(("phase", "copying", "outcome"), [
    (Phase.PRECHECK, False, "rolled-back"),
    (Phase.EXTEND_VLAN, False, "rolled-back"),
    (Phase.PRESET_PORT, False, "rolled-back"),
    (Phase.START_DESTINATION, False, "rolled-back"),
    (Phase.PRECOPY, True, "rolled-back"),
    (Phase.PRECOPY, False, "completed"),
    (Phase.SWITCHOVER, False, "completed"),
    (Phase.ANNOUNCE, False, "completed"),
    (Phase.CLEAN_SOURCE, False, "completed"),
    (Phase.PRUNE_VLAN, False, "completed"),
    (Phase.VERIFY, False, "completed"),
])
def test_recovery_from_each_phase(site: Site, phase: Phase, copying: bool,
                                  outcome: str) -> None:
    migration_id = die_at(site, phase, copying=copying)
    controller, migrations = site.new_controller()
    try:
        assert migrations.resume_unfinished() == [migration_id]
        record = migrations.wait(migration_id, WAIT_S)
    finally:
        controller.close()
    assert record.state == outcome, record.error
    if outcome == "completed":
        assert vm_row(site) == ("host3", "running")
        assert site.hypervisors["host3"].state("vm1") is GuestState.RUNNING
        assert site.hypervisors["host1"].state("vm1") is GuestState.ABSENT
        assert site.agents["host1"].uplink_vlans() == []
    else:
        assert record.error is not None and "restarted" in record.error
        stays_on_source(site, record)
    assert no_switchover_rules(site)


def test_audit_finds_switchover_rules_left_by_a_dead_migration(site: Site) -> None:
    from vmferry.controller import audit
    from vmferry.model.switchover import mbb_cookie
    site.create_vm()
    site.agents["host1"].open_switchover("vm1", mbb_cookie(77), 100, "52:54:00:00:00:01")
    found = [(f.kind, f.where, f.what) for f in audit.audit(site.controller)]
    assert found == [("switchover-flow", "host1", f"{mbb_cookie(77):#x}")]
    assert audit.fix(site.controller, audit.audit(site.controller)) == []
    assert no_switchover_rules(site)


def test_audit_finds_a_vm_mac_left_pinned_and_unpins_it(site: Site) -> None:
    from vmferry.controller import audit
    site.create_vm()
    mac = site.controller.vm("vm1").mac
    site.fabric.pin_mac("tor1", "h-host1", 100, mac)
    site.fabric.pin_mac("spine", "t-tor1", 100, "52:54:00:99:99:99")   # not a VM's: kept
    found = [(f.kind, f.where, f.what) for f in audit.audit(site.controller)]
    assert found == [("switchover-pin", "tor1", f"100/{mac.lower()}")]
    assert audit.fix(site.controller, audit.audit(site.controller)) == []
    assert site.fabric.switches["tor1"].pinned == {}
    assert site.fabric.switches["spine"].pinned


def test_recovery_resumes_a_finished_source_when_the_destination_died(site: Site) -> None:
    migration_id = die_at(site, Phase.PRECOPY)
    assert site.hypervisors["host1"].state("vm1") is GuestState.POSTMIGRATE
    site.hypervisors["host3"].kill("vm1")
    controller, migrations = site.new_controller()
    try:
        migrations.resume_unfinished()
        record = migrations.wait(migration_id, WAIT_S)
    finally:
        controller.close()
    assert record.state == "rolled-back", record.error
    stays_on_source(site, record)


@pytest.mark.parametrize(("source", "destination", "issued", "way"), [
    (("running", "active"), ("inmigrate", "none"), True, "rollback"),
    (("postmigrate", "completed"), ("running", "none"), True, "forward"),
    (("postmigrate", "completed"), ("inmigrate", "none"), True, "forward"),
    (("postmigrate", "completed"), ("absent", "none"), True, "rollback"),
    (("postmigrate", "completed"), ("unreachable", "unknown"), True, "unknown"),
    (("running", "completed"), ("absent", "none"), False, "rollback"),
    (("paused", "postcopy-active"), ("running", "none"), True, "follow"),
    (("paused", "postcopy-paused"), ("running", "none"), True, "hold"),
    (("running", "cancelled"), ("running", "none"), True, "hold"),
    (("absent", "none"), ("running", "none"), True, "forward"),
    (("absent", "none"), ("absent", "none"), True, "hold"),
    (("unreachable", "unknown"), ("running", "none"), True, "unknown"),
    (("running", "active"), ("unreachable", "unknown"), True, "rollback"),
])
def test_the_way_out_comes_from_both_qemus(source: tuple[str, str],
                                           destination: tuple[str, str], issued: bool,
                                           way: str) -> None:
    decision = truth.decide(truth.Truth(truth.End(*source), truth.End(*destination)),
                            issued=issued)
    assert decision.way.value == way, decision.reason


# ---- the site around one migration ------------------------------------------------------------

def test_one_dead_host_does_not_stop_the_site(site: Site) -> None:
    site.unreachable.add("host4")
    site.create_vm()
    record = finish(site, site.migrate())         # host1 -> host3: host4 is not on the path
    assert record.state == "completed", record.error
    assert "host4:uplink" in site.controller.fabric_drift
    trunk = next(t for t in site.controller.fabric_state() if t.a == "host4")
    assert trunk.actual_a is None and trunk.error is not None and not trunk.in_sync


def test_a_dead_switch_fails_only_the_moves_through_it(site: Site) -> None:
    site.fabric.fail.add("tor2")
    site.create_vm()                              # host1's VLAN path: host1, tor1
    record = finish(site, site.migrate(to="host3"))
    assert record.state == "rolled-back", record.error
    assert record.error is not None and "tor2" in record.error
    stays_on_source(site, record)
    record = finish(site, site.migrate(to="host2"))
    assert record.state == "completed", record.error
    assert any(end.startswith("tor2:") for end in site.controller.fabric_drift)


def test_capacity_counts_the_vms_migrating_in(site: Site) -> None:
    from vmferry.api.controller import VmCreate
    from vmferry.errors import CapacityError
    record = held(site)                           # vm1 (256 MiB) on its way to host3
    site.controller.create_vm(VmCreate(name="big", host="host2", vlan=100,
                                       ip="192.0.2.11/24", memory_mib=1800), site.actor())
    with pytest.raises(CapacityError, match="1792 MiB free"):
        site.migrate("big", to="host3")
    site.release("host1", "vm1")
    assert finish(site, record).state == "completed"


def test_a_migrating_vm_cannot_be_changed(site: Site) -> None:
    from vmferry.errors import ConflictError
    record = held(site)
    with pytest.raises(ConflictError, match="already migrating"):
        site.migrate(to="host2")
    with pytest.raises(ConflictError):
        site.controller.delete_vm("vm1", site.actor())
    site.release("host1", "vm1")
    assert finish(site, record).state == "completed"
    site.controller.delete_vm("vm1", site.actor())   # the lock went with the run


def test_one_address_per_vlan_in_the_store(site: Site) -> None:
    from sqlalchemy.exc import IntegrityError
    site.create_vm()
    with pytest.raises(IntegrityError), site.store.session() as session:
        session.add(VmRow(name="twin", host="host2", memory_mib=64, vlan=100,
                          ip="192.0.2.10/24", mac="52:54:00:ff:ff:01", state="running"))


# ---- guest memory integrity -----------------------------------------------------------------

def memcheck_vm(site: Site, console: str) -> MigrationRecord:
    from vmferry.api.controller import VmCreate
    site.controller.create_vm(VmCreate(name="vm1", host="host1", vlan=100, ip="192.0.2.10/24",
                                       memory_mib=256, memcheck_mib=64), site.actor())
    assert site.hypervisors["host1"].spec("vm1").memcheck_mib == 64
    # What the guest prints on the destination's console once it runs there.
    site.hypervisors["host3"].consoles["vm1"] = console
    return finish(site, site.migrate())


def test_memory_verdict_recorded_after_the_move(site: Site) -> None:
    record = memcheck_vm(site, "VMFERRY-MEMCHECK start blocks=64 rate=8\n"
                               "VMFERRY-MEMCHECK pass=7 blocks=64 failures=0\n")
    assert record.state == "completed", record.error
    assert site.hypervisors["host3"].spec("vm1").memcheck_mib == 64
    memcheck = (record.result.model_extra or {})["memcheck"]
    assert memcheck["intact"] is True and memcheck["last_pass"] == 7


def test_changed_memory_fails_the_move_for_an_operator(site: Site) -> None:
    record = memcheck_vm(site, "VMFERRY-MEMCHECK-FAIL pass=7 block=3 pattern=1 want=a got=b\n"
                               "VMFERRY-MEMCHECK pass=7 blocks=64 failures=1\n")
    assert record.state == "failed"
    assert record.error is not None and "memory changed" in record.error
    memcheck = (record.result.model_extra or {})["memcheck"]
    assert memcheck["intact"] is False and memcheck["failures"] == 1


def test_memcheck_on_the_kernel_command_line() -> None:
    from vmferry.drivers.hypervisor.base import GuestSpec
    from vmferry.drivers.hypervisor.qemu_cmdline import kernel_append, parse_kernel_append
    spec = GuestSpec(name="g", memory_mib=256, mac="52:54:00:00:00:01", tap="t1",
                     ip_cidr="192.0.2.1/24", memcheck_mib=32)
    assert parse_kernel_append(kernel_append(spec))["memcheck"] == "32"
    assert "memcheck" not in kernel_append(GuestSpec(name="g", memory_mib=256,
                                                     mac="52:54:00:00:00:01", tap="t1",
                                                     ip_cidr="192.0.2.1/24"))


def test_a_store_blip_mid_run_is_decided_not_abandoned(site: Site,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    from vmferry.controller import migration as migration_module
    monkeypatch.setattr(migration_module, "CRASH_BACKOFF_S", 0.05)
    real_progress = Run.progress
    broken = threading.Event()

    def progress(self: Run, value: object) -> None:
        # Only this site's run breaks: a migration thread that an earlier test left behind
        # (its site closed while the copy was held) calls Run.progress too, and breaking it
        # instead left this run copying for ever.
        if self.store is site.store and not broken.is_set():
            broken.set()
            raise OperationalError("UPDATE migrations", {}, Exception("database is locked"))
        real_progress(self, value)  # type: ignore[arg-type]
    monkeypatch.setattr(Run, "progress", progress)
    record = finish(site, held(site))
    # Had the error escaped the phase, the run is taken up again after a backoff: wait for
    # the end (bounded), not only for the first try.
    deadline = time.monotonic() + WAIT_S
    while record.state == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        record = site.migrations.get(record.id)
    assert broken.is_set()
    assert record.state == "rolled-back", record.error      # QEMU was still copying
    stays_on_source(site, record)


def test_failpoints_hold_for_their_seconds_or_until_released(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmferry import failpoints
    monkeypatch.setenv(failpoints.ENV, "hold-after:precopy, inside:precopy-copying=2.5,x=soon")
    assert failpoints.armed() == {"hold-after:precopy": failpoints.HOLD_SECONDS,
                                  "inside:precopy-copying": 2.5,
                                  "x": failpoints.HOLD_SECONDS}
    release = tmp_path / "release"
    monkeypatch.setenv(failpoints.RELEASE_ENV, str(release))
    released = threading.Event()

    def hold() -> None:
        failpoints.reached("hold-after:precopy")
        released.set()
    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert not released.wait(0.3)           # held
    release.touch()
    assert released.wait(WAIT_S)            # the file lets it go (not the ten minutes)
    failpoints.reached("not-armed")         # a no-op
