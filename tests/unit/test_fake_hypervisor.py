"""FakeHypervisor: the in-memory driver the agent and engine unit tests stand on."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest

from vmferry.drivers.hypervisor.base import GuestSpec, GuestState, Hypervisor, MigrationTuning
from vmferry.drivers.hypervisor.fake import FakeHypervisor, FakeNetwork
from vmferry.drivers.hypervisor.history import HISTORY_LENGTH, EventHistory
from vmferry.errors import HypervisorError, InputError, WaitTimeout

SPEC = GuestSpec(name="web1", memory_mib=256, mac="52:54:00:ab:cd:01", tap="vft-web1",
                 ip_cidr="192.0.2.10/24")
URI = "tcp:198.51.100.2:49152"


class Pair:
    """A source with a running guest and a destination on the same fake network."""

    def __init__(self, *, auto_step: bool = False) -> None:
        ticks = itertools.count(1)
        self.network = FakeNetwork()
        self.src = FakeHypervisor("h1", network=self.network, auto_step=auto_step,
                                  clock=lambda: float(next(ticks)))
        self.dst = FakeHypervisor("h2", network=self.network, auto_step=auto_step,
                                  clock=lambda: float(next(ticks)))
        self.src.start(SPEC)

    def listen(self, tuning: MigrationTuning | None = None) -> None:
        self.dst.start(SPEC, incoming_uri=URI, tuning=tuning)

    def kinds(self, hv: FakeHypervisor) -> list[tuple[str, str | None]]:
        return [(e.kind, e.status) for e in hv.events(SPEC.name)]


def cause(error: HypervisorError) -> str:
    return str(error.fields["cause"])


@pytest.fixture
def pair() -> Iterator[Pair]:
    yield Pair()


def test_the_fake_implements_the_whole_interface() -> None:
    assert not FakeHypervisor.__abstractmethods__
    assert isinstance(FakeHypervisor(), Hypervisor)


def test_completed_migration_runs_the_destination(pair: Pair) -> None:
    pair.listen()
    assert pair.dst.state(SPEC.name) is GuestState.INMIGRATE
    pair.src.migrate(SPEC.name, URI, MigrationTuning())
    assert pair.src.migration_progress(SPEC.name).status == "setup"
    assert pair.src.run_migration(SPEC.name) == "completed"
    assert pair.src.state(SPEC.name) is GuestState.POSTMIGRATE
    assert pair.dst.state(SPEC.name) is GuestState.RUNNING
    progress = pair.src.migration_progress(SPEC.name)
    assert progress.transferred_bytes == progress.total_bytes == 256 << 20
    assert pair.kinds(pair.src) == [
        ("RESUME", None), ("MIGRATION", "setup"), ("MIGRATION", "active"),
        ("MIGRATION_PASS", None), ("MIGRATION_PASS", None), ("STOP", None),
        ("MIGRATION", "device"), ("MIGRATION", "completed")]
    assert pair.kinds(pair.dst) == [("MIGRATION", "active"), ("MIGRATION", "completed"),
                                    ("RESUME", None)]
    events = pair.src.events(SPEC.name)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    stop = next(e for e in events if e.kind == "STOP")
    resume = pair.dst.events(SPEC.name)[-1]
    assert stop.timestamp < resume.timestamp
    # The URI is free again: a second listener may take it.
    pair.src.stop(SPEC.name)
    pair.src.start(SPEC, incoming_uri=URI)


def test_pause_before_switchover_holds_until_continue(pair: Pair) -> None:
    tuning = MigrationTuning(pause_before_switchover=True)
    pair.listen(tuning)
    pair.src.migrate(SPEC.name, URI, tuning)
    with pytest.raises(HypervisorError) as info:
        pair.src.continue_migration(SPEC.name)
    assert "not in expected state" in cause(info.value)
    assert pair.src.run_migration(SPEC.name) == "pre-switchover"
    assert pair.src.step(SPEC.name) == "pre-switchover"       # does not move by itself
    assert pair.src.state(SPEC.name) is GuestState.PAUSED
    assert pair.dst.state(SPEC.name) is GuestState.INMIGRATE
    mark = pair.src.events(SPEC.name)[-1].seq
    pair.src.continue_migration(SPEC.name)
    assert [(e.kind, e.status) for e in pair.src.events(SPEC.name, after=mark)] == [
        ("MIGRATION", "device")]
    assert pair.src.run_migration(SPEC.name) == "completed"
    assert pair.dst.state(SPEC.name) is GuestState.RUNNING


def test_wait_migration_waits_in_pre_switchover_for_another_thread() -> None:
    pair = Pair(auto_step=True)
    tuning = MigrationTuning(pause_before_switchover=True)
    pair.listen(tuning)
    pair.src.migrate(SPEC.name, URI, tuning)

    def switch_over() -> None:
        # What the engine does: wait for the event, redirect the network, continue.
        after = 0
        while True:
            for event in pair.src.events(SPEC.name, after=after, timeout=5.0):
                after = event.seq
                if event.status == "pre-switchover":
                    pair.src.continue_migration(SPEC.name)
                    return

    thread = threading.Thread(target=switch_over)
    thread.start()
    seen: list[str] = []
    progress = pair.src.wait_migration(SPEC.name, timeout=10.0,
                                       on_progress=lambda p: seen.append(p.status))
    thread.join(timeout=10)
    assert progress.status == "completed"
    assert "pre-switchover" in seen
    assert pair.dst.state(SPEC.name) is GuestState.RUNNING


def test_destination_dying_fails_the_migration_and_the_source_runs(pair: Pair) -> None:
    pair.listen()
    pair.src.migrate(SPEC.name, URI, MigrationTuning())
    pair.src.step(SPEC.name)
    pair.dst.kill(SPEC.name)
    assert pair.src.step(SPEC.name) == "failed"
    progress = pair.src.migration_progress(SPEC.name)
    assert progress.error is not None and "destination gone" in progress.error
    assert pair.src.state(SPEC.name) is GuestState.RUNNING
    assert pair.dst.state(SPEC.name) is GuestState.ABSENT


def test_a_broken_link_fails_the_migration_and_the_destination_waits(pair: Pair) -> None:
    tuning = MigrationTuning(pause_before_switchover=True)
    pair.listen(tuning)
    pair.src.migrate(SPEC.name, URI, tuning)
    assert pair.src.run_migration(SPEC.name) == "pre-switchover"
    pair.network.break_link(URI)
    pair.src.continue_migration(SPEC.name)
    assert pair.src.migration_progress(SPEC.name).status == "failed"
    # Stopped for the switchover, running again on the source after the failure.
    assert pair.kinds(pair.src)[-2:] == [("MIGRATION", "failed"), ("RESUME", None)]
    assert pair.src.state(SPEC.name) is GuestState.RUNNING
    # Nothing reached the destination to tell it: it waits until someone stops it.
    assert pair.dst.state(SPEC.name) is GuestState.INMIGRATE
    assert [e.status for e in pair.dst.events(SPEC.name)] == ["active"]


def test_no_listener_is_connection_refused(pair: Pair) -> None:
    pair.src.migrate(SPEC.name, URI, MigrationTuning())
    assert pair.src.step(SPEC.name) == "failed"
    assert pair.src.migration_progress(SPEC.name).error == "Connection refused"


def test_scripted_failure(pair: Pair) -> None:
    pair.listen()
    pair.src.script_migration(SPEC.name, ["setup", "active", "failed"])
    pair.src.migrate(SPEC.name, URI, MigrationTuning())
    assert pair.src.run_migration(SPEC.name) == "failed"
    assert pair.src.state(SPEC.name) is GuestState.RUNNING
    # The script was for one migration: the next goes the default way.
    pair.listen()
    pair.src.migrate(SPEC.name, URI, MigrationTuning())
    assert pair.src.run_migration(SPEC.name) == "completed"


def test_a_migration_that_never_converges_times_out_and_is_cancelled() -> None:
    pair = Pair(auto_step=True)
    pair.listen()
    pair.src.script_migration(SPEC.name, ["setup", "active"], converge=False)
    pair.src.migrate(SPEC.name, URI, MigrationTuning())
    with pytest.raises(WaitTimeout, match="was active; cancelled"):
        pair.src.wait_migration(SPEC.name, timeout=0.05)
    assert pair.src.migration_progress(SPEC.name).status == "cancelled"
    assert pair.src.state(SPEC.name) is GuestState.RUNNING
    assert pair.dst.state(SPEC.name) is GuestState.ABSENT


def test_postcopy_needs_it_on_both_sides_and_runs_the_destination_early(pair: Pair) -> None:
    pair.listen(MigrationTuning())
    pair.src.migrate(SPEC.name, URI, MigrationTuning(postcopy=True))
    pair.src.step(SPEC.name)
    with pytest.raises(HypervisorError) as info:
        pair.src.start_postcopy(SPEC.name)
    assert "Enable postcopy" in cause(info.value)
    pair.src.cancel_migration(SPEC.name)
    pair.listen(MigrationTuning(postcopy=True))
    pair.src.migrate(SPEC.name, URI, MigrationTuning(postcopy=True))
    pair.src.step(SPEC.name)
    pair.src.start_postcopy(SPEC.name)
    assert pair.dst.state(SPEC.name) is GuestState.RUNNING
    assert pair.src.migration_progress(SPEC.name).status == "postcopy-active"
    assert pair.src.step(SPEC.name) == "completed"


@pytest.mark.parametrize("uri", ["exec:touch /tmp/x", "file:/etc/shadow", "unix:/tmp/s",
                                 "fd:3", "tcp:198.51.100.2", "tcp:198.51.100.2:0",
                                 "tcp:198.51.100.2:70000", "tcp:bad host:1",
                                 "tcp:198.51.100.2:1,ipv4=on", "tcp:[zz::1]:1",
                                 "tcp:300.1.1.1:1", "rdma:198.51.100.2:1"])
def test_only_tcp_uris(pair: Pair, uri: str) -> None:
    with pytest.raises(InputError) as info:
        pair.src.migrate(SPEC.name, uri, MigrationTuning())
    assert info.value.field == "uri"
    with pytest.raises(InputError):
        pair.dst.start(SPEC, incoming_uri=uri)
    assert pair.dst.guests() == []
    assert pair.src.migration_progress(SPEC.name).status == "none"


@pytest.mark.parametrize("uri", ["tcp:198.51.100.2:49152", "tcp:[2001:db8::2]:1",
                                 "tcp:host2.example:65535"])
def test_tcp_uris_are_accepted(pair: Pair, uri: str) -> None:
    pair.dst.start(SPEC, incoming_uri=uri)
    assert pair.dst.state(SPEC.name) is GuestState.INMIGRATE


def test_events_wait_is_bounded_and_wakes_on_an_event(pair: Pair) -> None:
    last = pair.src.events(SPEC.name)[-1].seq
    assert pair.src.events(SPEC.name, after=last, timeout=0.05) == []
    pair.listen()
    pair.src.migrate(SPEC.name, URI, MigrationTuning())
    timer = threading.Timer(0.05, pair.src.step, args=(SPEC.name,))
    timer.start()
    try:
        got = pair.src.events(SPEC.name, after=pair.src.events(SPEC.name)[-1].seq,
                              timeout=10.0)
    finally:
        timer.join()
    assert got and got[0].status == "active"


def test_guest_lifecycle_and_failures(pair: Pair) -> None:
    assert pair.src.start(SPEC) == pair.src.start(SPEC)       # idempotent
    assert pair.src.guests() == ["web1"]
    assert pair.src.spec(SPEC.name) == SPEC
    pair.src.announce(SPEC.name)
    assert pair.src.announcements == {"web1": 1}
    last = pair.src.events(SPEC.name)[-1].seq
    pair.src.stop(SPEC.name)
    assert pair.src.state(SPEC.name) is GuestState.ABSENT
    with pytest.raises(HypervisorError, match="not running"):
        pair.src.migration_progress(SPEC.name)
    pair.src.fail_next_start(SPEC.name, "tap missing")
    with pytest.raises(HypervisorError, match="failed to start"):
        pair.src.start(SPEC)
    pair.src.start(SPEC)
    # A new guest of the same name: old events are gone, seq keeps counting.
    assert [e.seq for e in pair.src.events(SPEC.name)] == [last + 1]
    pair.listen()
    with pytest.raises(HypervisorError) as info:
        FakeHypervisor("h3", network=pair.network).start(SPEC, incoming_uri=URI)
    assert cause(info.value) == "Address already in use"
    with pytest.raises(InputError):
        pair.src.start(GuestSpec(**{**SPEC.__dict__, "name": "x", "machine": "virt"}))


def test_resume_of_an_incoming_guest_is_refused(pair: Pair) -> None:
    pair.listen()
    with pytest.raises(HypervisorError) as info:
        pair.dst.resume(SPEC.name)
    assert "not finalized" in cause(info.value)


def test_history_is_bounded_and_seq_survives_reset() -> None:
    history = EventHistory()
    for i in range(HISTORY_LENGTH + 5):
        history.record("MIGRATION_PASS", None, float(i))
    kept = history.after(0)
    assert len(kept) == HISTORY_LENGTH and kept[0].seq == 6
    history.reset()
    assert history.after(0) == []
    assert history.record("STOP", None, 1.0).seq == HISTORY_LENGTH + 6
    found, last = history.wait(0, 0.0, kinds=["RESUME"])
    assert found == [] and last == HISTORY_LENGTH + 6
