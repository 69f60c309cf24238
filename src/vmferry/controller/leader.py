"""One controller acts at a time: a lease row in the store, renewed while the controller lives.

A second controller on the same store refuses to start while the lease is fresh. A controller
that was killed leaves a lease that expires after ``ttl`` seconds -- at once when the holder was
a process on this machine that no longer exists, so a restart need not wait."""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from vmferry import privileged
from vmferry.errors import ConflictError
from vmferry.store.db import Store
from vmferry.store.schema import LeaderRow

log = logging.getLogger(__name__)


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _holder_gone(holder: str) -> bool:
    host, _, pid = holder.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not privileged.pid_alive(int(pid))


class LeaderLease:
    def __init__(self, store: Store, *, holder: str | None = None, ttl: float = 10.0) -> None:
        self.store = store
        self.holder = holder or this_process()
        self.ttl = ttl
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease or raise ConflictError naming who holds it."""
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=self.ttl)
        with self.store.session() as session:
            row = session.get(LeaderRow, 1)
            if row is None:
                try:
                    session.add(LeaderRow(id=1, holder=self.holder, expires_at=expires))
                    session.flush()
                    return
                except IntegrityError:
                    session.rollback()
                    row = session.get(LeaderRow, 1)
                    assert row is not None
            current, current_expiry = row.holder, _aware(row.expires_at)
            takeable = current == self.holder or current_expiry < now or _holder_gone(current)
            if not takeable:
                raise ConflictError("leader", f"another controller ({current}) leads this store "
                                    f"until {current_expiry.isoformat()}")
            # Conditional on what we read, so two contenders cannot both win.
            result = session.execute(update(LeaderRow).where(
                LeaderRow.id == 1, LeaderRow.holder == current,
                LeaderRow.expires_at == row.expires_at).values(holder=self.holder,
                                                                expires_at=expires))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise ConflictError("leader", "another controller took the lease just now")

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="leader-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                with self.store.session() as session:
                    session.execute(update(LeaderRow).where(
                        LeaderRow.id == 1, LeaderRow.holder == self.holder).values(
                        expires_at=datetime.now(UTC) + timedelta(seconds=self.ttl)))
            except Exception:  # a store hiccup must not kill the renewer; retry next round
                log.exception("renewing the leader lease failed")

    def release(self) -> None:
        self._stop.set()
        with self.store.session() as session:
            session.execute(update(LeaderRow).where(
                LeaderRow.id == 1, LeaderRow.holder == self.holder).values(
                expires_at=datetime.now(UTC)))


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
