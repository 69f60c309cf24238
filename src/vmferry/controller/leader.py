"""One controller acts at a time, fenced.

The lease is a row in the store, timed by the store's own clock (never a controller's wall
clock, which may be skewed; on SQLite, which has no clock but the process's, a holder alive
on this machine keeps the lease however far another controller's clock runs ahead). Every
change of holder raises the row's ``epoch``: the fencing token. A controller's migration
writes check, in the same transaction, that the epoch is still theirs (``LeaderLease.check``),
so a deposed leader that did not notice yet cannot write. The renewal notices a lost lease
(someone else's epoch, or no renewal within the lease's time) and stops the controller acting
(``lost``). On PostgreSQL the leader also holds a session advisory lock, which the database
drops with the connection of a dead controller.

A store that is down for a few seconds (a PostgreSQL restart) is ridden out: a failed renewal
is retried every ``RETRY_S``, the lease lasts ``DEFAULT_TTL`` (several renewal periods plus
such an outage), and an advisory lock lost with its connection is taken again (or, if another
controller took it meanwhile, the lease is lost).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from vmferry import privileged
from vmferry.errors import ConflictError
from vmferry.store.db import Store
from vmferry.store.schema import LeaderRow

log = logging.getLogger(__name__)

# The advisory lock's key on PostgreSQL ("vmferry" in ASCII, as a 64-bit number).
ADVISORY_KEY = 0x766D6665727279
DEFAULT_TTL = 15.0
RENEWALS_PER_TTL = 5
RETRY_S = 0.5          # after a failed renewal: back as soon as the store is


# Not a VmferryError on purpose: nothing that handles errors may catch it.
class Fenced(Exception):
    """This controller is not the leader any more: it must stop acting at once."""


def this_process() -> str:
    # The random part: a reused pid on the same host is not the same controller.
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _holder_here(holder: str) -> int | None:
    """The pid of a holder on this machine (None: elsewhere, or no pid in its name)."""
    host, _, rest = holder.partition(":")
    pid = rest.split(":")[0]
    return int(pid) if host == socket.gethostname() and pid.isdigit() else None


def _holder_gone(holder: str) -> bool:
    pid = _holder_here(holder)
    return pid is not None and not privileged.pid_alive(pid)


def _holder_alive_here(holder: str) -> bool:
    pid = _holder_here(holder)
    return pid is not None and privileged.pid_alive(pid)


def store_now(session: Session) -> datetime:
    """The store's clock (aware, UTC): the only clock the lease is timed by."""
    if session.get_bind().dialect.name == "sqlite":
        value = session.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)
    moment = session.execute(text("SELECT clock_timestamp()")).scalar_one()
    assert isinstance(moment, datetime)
    return _aware(moment)


class LeaderLease:
    def __init__(self, store: Store, *, holder: str | None = None, ttl: float = DEFAULT_TTL,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.store = store
        self.holder = holder or this_process()
        self.ttl = ttl
        self.epoch = 0
        self.on_lost = on_lost
        self.lost = threading.Event()
        self._renewed_at = 0.0          # monotonic: our own time since the last renewal
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._advisory: Connection | None = None

    # ---- taking it ----------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease or raise ConflictError naming who holds it."""
        self._take_advisory_lock()
        try:
            self._acquire_row()
        except BaseException:
            self._drop_advisory_lock()
            raise
        self.lost.clear()
        self._renewed_at = time.monotonic()

    def _acquire_row(self) -> None:
        with self.store.session() as session:
            now = store_now(session)
            expires = now + timedelta(seconds=self.ttl)
            row = session.get(LeaderRow, 1)
            if row is None:
                try:
                    session.add(LeaderRow(id=1, holder=self.holder, expires_at=expires, epoch=1))
                    session.flush()
                    self.epoch = 1
                    return
                except IntegrityError:
                    session.rollback()
                    row = session.get(LeaderRow, 1)
                    assert row is not None
            current, current_expiry, epoch = row.holder, _aware(row.expires_at), row.epoch
            ours = current == self.holder and epoch == self.epoch
            # SQLite has no clock of its own: "now" is this process's clock, which may be
            # skewed. Every controller of a SQLite store runs on its machine, so a holder
            # that is alive here keeps the lease whatever the clocks say.
            expired = current_expiry < now and not (
                session.get_bind().dialect.name == "sqlite" and _holder_alive_here(current))
            takeable = ours or expired or _holder_gone(current) or self._advisory is not None
            if not takeable:
                raise ConflictError("leader", f"another controller ({current}) leads this store "
                                    f"until {current_expiry.isoformat()}")
            new_epoch = epoch if ours else epoch + 1
            # Conditional on what we read, so two contenders cannot both win.
            result = session.execute(update(LeaderRow).where(
                LeaderRow.id == 1, LeaderRow.holder == current, LeaderRow.epoch == epoch)
                .values(holder=self.holder, expires_at=expires, epoch=new_epoch))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise ConflictError("leader", "another controller took the lease just now")
            self.epoch = new_epoch

    def _take_advisory_lock(self) -> None:
        """PostgreSQL: a session advisory lock, held on a connection of its own for as long as
        this controller leads; a dead controller's connection (and lock) goes with it."""
        if self.store.engine.dialect.name != "postgresql" or self._advisory is not None:
            return
        connection = self.store.engine.connect()
        try:
            got = connection.execute(text("SELECT pg_try_advisory_lock(:key)"),
                                     {"key": ADVISORY_KEY}).scalar_one()
            connection.commit()
        except BaseException:
            connection.close()
            raise
        if not got:
            connection.close()
            raise ConflictError("leader", "another controller holds this store's leader lock")
        self._advisory = connection

    def _drop_advisory_lock(self) -> None:
        connection, self._advisory = self._advisory, None
        if connection is None:
            return
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_KEY})
            connection.commit()
        except SQLAlchemyError:
            pass            # the lock goes with the connection anyway
        finally:
            connection.close()

    # ---- keeping it ---------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """Leader as far as this controller can tell: not lost, renewed within the lease."""
        return not self.lost.is_set() and time.monotonic() - self._renewed_at < self.ttl

    def check(self, session: Session) -> None:
        """Fence a write: raises ``Fenced`` unless the store still names this controller's
        epoch. Call it inside the transaction of the write it guards."""
        if not self.is_leader():
            raise Fenced(f"controller {self.holder} lost the leader lease")
        row = session.execute(select(LeaderRow.holder, LeaderRow.epoch)
                              .where(LeaderRow.id == 1).with_for_update(read=True)).first()
        if row is None or row.holder != self.holder or row.epoch != self.epoch:
            self._lose("the store names another leader")
            raise Fenced(f"controller {self.holder} (epoch {self.epoch}) was deposed")

    def renew(self) -> bool:
        """One renewal; False (and ``lost`` set) when the lease is not ours any more."""
        try:
            with self.store.session() as session:
                now = store_now(session)
                result = session.execute(update(LeaderRow).where(
                    LeaderRow.id == 1, LeaderRow.holder == self.holder,
                    LeaderRow.epoch == self.epoch).values(
                    expires_at=now + timedelta(seconds=self.ttl)))
                if result.rowcount != 1:  # type: ignore[attr-defined]
                    self._lose("another controller took the lease")
                    return False
            self._keep_advisory_lock()
            self._renewed_at = time.monotonic()
            return True
        except ConflictError as exc:
            self._lose(exc.message)
            return False
        except SQLAlchemyError as exc:
            # Not renewed: once the lease's time is over by our own clock, we stop.
            log.warning("renewing the leader lease failed: %s", exc)
            if time.monotonic() - self._renewed_at >= self.ttl:
                self._lose("the lease could not be renewed in time")
            return False

    def _keep_advisory_lock(self) -> None:
        """The lock's connection dies with a restart of the database, and the lock with it:
        take it again on a new connection. ConflictError if another controller holds it."""
        if self.store.engine.dialect.name != "postgresql":
            return
        if self._advisory is not None:
            try:
                self._advisory.execute(text("SELECT 1"))
                self._advisory.commit()
                return
            except SQLAlchemyError as exc:
                log.warning("the leader lock's connection is gone (%s): taking the lock again",
                            exc.__class__.__name__)
                self._drop_advisory_lock()
        self._take_advisory_lock()

    def _lose(self, why: str) -> None:
        if self.lost.is_set():
            return
        log.error("leader lease lost (%s): this controller stops acting", why)
        self.lost.set()
        if self.on_lost is not None:
            self.on_lost()

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="leader-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        wait = self.ttl / RENEWALS_PER_TTL
        while not self._stop.wait(wait) and not self.lost.is_set():
            wait = self.ttl / RENEWALS_PER_TTL if self.renew() else min(RETRY_S, wait)

    def release(self) -> None:
        self._stop.set()
        try:
            with self.store.session() as session:
                session.execute(update(LeaderRow).where(
                    LeaderRow.id == 1, LeaderRow.holder == self.holder,
                    LeaderRow.epoch == self.epoch).values(expires_at=store_now(session)))
        finally:
            self._drop_advisory_lock()


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
