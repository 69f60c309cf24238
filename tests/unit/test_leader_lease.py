"""The controller lease: one leader per store, taken over when the holder is gone."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmferry.controller.leader import LeaderLease
from vmferry.errors import ConflictError
from vmferry.store.db import Store


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    store.create_schema()
    return store


def test_second_controller_refuses_while_lease_is_fresh(store: Store) -> None:
    first = LeaderLease(store, holder="elsewhere:1", ttl=30)
    first.acquire()
    with pytest.raises(ConflictError, match="elsewhere:1"):
        LeaderLease(store, holder="elsewhere:2", ttl=30).acquire()
    first.acquire()  # the holder may renew
    first.release()
    LeaderLease(store, holder="elsewhere:2", ttl=30).acquire()


def test_expired_lease_is_taken_over(store: Store) -> None:
    LeaderLease(store, holder="elsewhere:1", ttl=-1).acquire()
    LeaderLease(store, holder="elsewhere:2", ttl=30).acquire()


def test_lease_of_a_dead_local_process_is_taken_at_once(store: Store) -> None:
    import socket
    LeaderLease(store, holder=f"{socket.gethostname()}:999999999", ttl=300).acquire()
    LeaderLease(store, ttl=30).acquire()


def test_holder_names_are_unique_per_lease(store: Store) -> None:
    first, second = LeaderLease(store), LeaderLease(store)
    assert first.holder != second.holder         # not only hostname:pid
    first.acquire()
    with pytest.raises(ConflictError):
        second.acquire()
