"""Fenced leadership: the store's clock times the lease, the epoch fences every write of a
migration, and a controller that lost the lease stops acting."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from enginekit import Site, site_at

from vmferry.controller import leader
from vmferry.controller.leader import Fenced, LeaderLease
from vmferry.controller.migration import Migrations
from vmferry.controller.run import Run
from vmferry.errors import ConflictError
from vmferry.store.db import Store
from vmferry.store.schema import LeaderRow


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    store.create_schema()
    return store


class _FutureClock(datetime):
    """A controller whose wall clock is an hour ahead."""

    @classmethod
    def now(cls, tz: object = None) -> _FutureClock:  # type: ignore[override]
        moment = datetime.now(tz) + timedelta(hours=1)  # type: ignore[arg-type]
        return cls.fromtimestamp(moment.timestamp(), moment.tzinfo)


def test_a_skewed_clock_does_not_take_a_fresh_lease(store: Store,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    LeaderLease(store, holder="a:1:x", ttl=30).acquire()
    monkeypatch.setattr(leader, "datetime", _FutureClock)
    with pytest.raises(ConflictError, match="a:1:x"):
        LeaderLease(store, holder="b:2:y", ttl=30).acquire()


def test_a_deposed_leader_is_fenced_and_notices(store: Store) -> None:
    old = LeaderLease(store, holder="a:1:x", ttl=0.3)
    old.acquire()
    assert old.epoch == 1
    time.sleep(0.4)                              # expired by the store's clock
    new = LeaderLease(store, holder="b:2:y", ttl=30)
    new.acquire()
    assert new.epoch == 2
    with store.session() as session, pytest.raises(Fenced):
        old.check(session)
    assert not old.renew()
    assert old.lost.is_set()
    with store.session() as session:
        new.check(session)                       # the new leader writes
        row = session.get(LeaderRow, 1)
        assert row is not None and (row.holder, row.epoch) == ("b:2:y", 2)


def test_a_leader_that_cannot_renew_in_time_stops_itself(store: Store) -> None:
    lease = LeaderLease(store, holder="a:1:x", ttl=0.3)
    lease.acquire()
    with store.session() as session:
        lease.check(session)
    time.sleep(0.4)                              # no renewal within the lease's time
    with store.session() as session, pytest.raises(Fenced):
        lease.check(session)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from site_at(tmp_path)


def test_two_controllers_on_one_store_only_one_acts(site: Site,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # ttl 3 s (a renewal every second): with 1 s a loaded 2-core machine missed renewals.
    first = LeaderLease(site.store, holder="a:1:x", ttl=3.0)
    first.acquire()
    first.start_renewing()
    migrations_a = Migrations(site.controller, lease=first)
    site.create_vm()
    site.hold("host1", "vm1")
    from vmferry.model.migration import MigrationOptions
    record = migrations_a.start("vm1", "host3", MigrationOptions(), site.actor())
    site.wait_status("host1", "vm1", "active")
    # A second controller whose clock runs an hour ahead cannot take over a renewed lease.
    second = LeaderLease(site.store, holder="b:2:y", ttl=30)
    with monkeypatch.context() as patch:
        patch.setattr(leader, "datetime", _FutureClock)
        for _ in range(3):
            with pytest.raises(ConflictError):
                second.acquire()
            time.sleep(0.4)
    # The first controller stalls (no renewal): it stops acting, the second takes over.
    first._stop.set()
    thread = migrations_a._threads[record.id]
    thread.join(20)
    assert not thread.is_alive()
    assert migrations_a.get(record.id).state == "running"    # the deposed one decided nothing
    deadline = time.monotonic() + 15
    while True:
        try:
            second.acquire()
            break
        except ConflictError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    controller_b, _ = site.new_controller()
    migrations_b = Migrations(controller_b, lease=second)
    try:
        assert migrations_b.resume_unfinished() == [record.id]
        final = migrations_b.wait(record.id, 20)
    finally:
        controller_b.close()
    assert final.state == "rolled-back", final.error
    # A write of the deposed controller is refused.
    run = Run(site.controller, record.id, threading.Event(), lambda r: None, first.check)
    with pytest.raises(Fenced):
        run.record_result(stale=True)
    assert "stale" not in (migrations_b.get(record.id).result.model_extra or {})
