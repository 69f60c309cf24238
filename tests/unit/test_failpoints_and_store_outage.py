"""Failpoints that hold at the Nth pass (a kill at a chosen place inside a loop, several
threads passing), and a leader lease that rides out a store outage shorter than the lease
but stops acting after a longer one."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from enginekit import Site, site_at
from sqlalchemy.exc import OperationalError

from vmferry import failpoints
from vmferry.controller import run as run_module
from vmferry.controller.leader import LeaderLease
from vmferry.controller.migration import Migrations
from vmferry.controller.run import Run
from vmferry.model.migration import MigrationOptions
from vmferry.store.db import Store

WAIT_S = 10.0


@pytest.fixture(autouse=True)
def _fresh_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failpoints, "_passes", {})


def test_a_point_armed_at_its_nth_pass_holds_only_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(failpoints.ENV, "inside:fabric-reconcile@3=30")
    monkeypatch.setenv(failpoints.RELEASE_ENV, str(tmp_path / "release"))
    assert failpoints.armed() == {"inside:fabric-reconcile": 30.0}
    passed: list[int] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        failpoints.reached("inside:fabric-reconcile")
        with lock:
            passed.append(index)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(5)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + WAIT_S
    while len(passed) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(passed) == 4             # four passed; exactly one (the third) holds
    (tmp_path / "release").touch()
    for thread in threads:
        thread.join(WAIT_S)
    assert len(passed) == 5
    failpoints.reached("inside:fabric-reconcile")       # the 6th pass: no hold


@pytest.mark.parametrize("spec", ["p@0", "p@x", "p@-1"])
def test_a_bad_pass_number_never_holds(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(failpoints.ENV, f"{spec}=30")
    started = time.monotonic()
    for _ in range(3):
        failpoints.reached("p")
    assert time.monotonic() - started < 5


class _Outage:
    """Makes the store's sessions fail (as a stopped PostgreSQL does) while ``down``."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down = False
        real = store.session

        @contextlib.contextmanager
        def session() -> Iterator[object]:
            if self.down:
                raise OperationalError("SELECT", {}, Exception("connection refused"))
            with real() as s:
                yield s
        monkeypatch.setattr(store, "session", session)


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    store.create_schema()
    return store


def test_an_outage_shorter_than_the_lease_is_ridden_out(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    lease = LeaderLease(store, holder="a:1:x", ttl=2.0)
    lease.acquire()
    outage = _Outage(store, monkeypatch)
    lease.start_renewing()
    try:
        outage.down = True
        time.sleep(1.0)                 # half the lease: several renewals fail
        assert lease.is_leader()
        outage.down = False
        time.sleep(1.5)                 # retried at once: renewed before the lease ran out
        assert lease.is_leader() and not lease.lost.is_set()
    finally:
        lease._stop.set()


def test_an_outage_longer_than_the_lease_stops_the_controller(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    lease = LeaderLease(store, holder="a:1:x", ttl=1.0)
    lease.acquire()
    outage = _Outage(store, monkeypatch)
    outage.down = True
    lease.start_renewing()
    try:
        assert lease.lost.wait(WAIT_S)
        outage.down = False
        time.sleep(0.5)
        assert not lease.is_leader()    # lost stays lost: a restart takes the lease again
    finally:
        lease._stop.set()


def test_sqlite_a_live_local_holder_keeps_the_lease_from_a_clock_ahead(store: Store) -> None:
    """SQLite's "now" is the contender's own clock: a clock hours ahead sees every lease
    expired. A holder alive on this machine keeps it all the same; a dead one does not."""
    import os
    import socket
    from datetime import UTC, datetime, timedelta

    from vmferry.errors import ConflictError
    from vmferry.store.schema import LeaderRow
    here = f"{socket.gethostname()}:{os.getpid()}:abcd1234"
    with store.session() as session:
        session.add(LeaderRow(id=1, holder=here, epoch=3,
                              expires_at=datetime.now(UTC) - timedelta(hours=2)))
    with pytest.raises(ConflictError, match="leads this store"):
        LeaderLease(store, holder="b:2:y", ttl=30).acquire()
    with store.session() as session:
        row = session.get(LeaderRow, 1)
        assert row is not None and row.holder == here and row.epoch == 3
        row.holder = f"{socket.gethostname()}:999999999:abcd1234"   # that process is gone
    taker = LeaderLease(store, holder="b:2:y", ttl=30)
    taker.acquire()
    assert taker.epoch == 4


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[Site]:
    yield from site_at(tmp_path)


def test_a_migration_write_waits_for_a_store_that_is_down_for_a_moment(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_module, "STORE_RETRY_POLL_S", 0.05)
    site.create_vm()
    site.hold("host1", "vm1")
    record = Migrations(site.controller).start("vm1", "host3", MigrationOptions(),
                                               site.actor())
    run = Run(site.controller, record.id, threading.Event(), lambda r: None)
    outage = _Outage(site.store, monkeypatch)
    outage.down = True
    threading.Timer(0.5, lambda: setattr(outage, "down", False)).start()
    run.record_result(during_outage=True)           # waits, then writes
    assert run.result()["during_outage"] is True
    monkeypatch.setattr(run_module, "STORE_RETRY_S", 0.3)
    outage.down = True
    with pytest.raises(OperationalError):          # down for longer: the error goes on
        run.record_result(too_long=True)
    outage.down = False
    site.release("host1", "vm1")
